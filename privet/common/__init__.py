"""Code shared by the server and the clients; imports neither."""
