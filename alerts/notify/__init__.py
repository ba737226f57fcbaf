"""Notifications, for alerts and work orders alike: where they go (`receivers`), what is sent
(`bodies`: CloudEvents, Alertmanager, PagerDuty), how (`http`) and the notifier that fans the
outbox out and delivers it, a lane per receiver (`notifier`)."""
