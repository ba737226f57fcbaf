"""Maintenance dispatch, the alerts plugin's second consumer: the roster and its pure planning
(`roster`), work orders and their steps (`orders`), the consumer that opens, assigns and
escalates them (`consumer`) and their HTTP routes (`routes`)."""
