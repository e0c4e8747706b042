"""The clinician web app: server-rendered pages over the store, French first."""
