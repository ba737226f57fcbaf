"""What the tests share: launching and waiting for the gateway, the small real servers that stand
for receivers, and the scenarios several test modules play."""
