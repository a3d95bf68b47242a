"""The sans-I/O core of the PBX side: message models, login, call state. No sockets here."""
