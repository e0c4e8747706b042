"""The site node: a hospital's live copy of the central store, which keeps serving when the central site is gone."""
