"""Who may do what: accounts with hashed passwords, roles, and sign-in sessions."""
