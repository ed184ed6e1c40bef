"""The playground: a static page at /playground/ that compares the base model with guided and searched
configurations side by side, through the server's own API."""
