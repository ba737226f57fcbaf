"""The alerts plugin's HTTP routes: alerts and rules, silences, work orders and the roster."""
