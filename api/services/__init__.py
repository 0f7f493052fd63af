"""Use cases behind the routes: each takes a session (and store) and calls repos; routes stay thin."""
