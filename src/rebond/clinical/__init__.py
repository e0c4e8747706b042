"""The clinical views over the store — ward census, patient chart, results — shared by the web app and the paper packs."""
