"""The words of the demo hospital group: services, names, drugs and lab tests with their reference ranges."""
from __future__ import annotations

from dataclasses import dataclass

SERVICES = (
    ("CARDIO", "Cardiologie", "394579002"),
    ("PNEUMO", "Pneumologie", "418112009"),
    ("MEDINT", "Médecine interne", "419192003"),
    ("GERIA", "Gériatrie", "394811001"),
    ("CHIDIG", "Chirurgie digestive", "394584008"),
    ("NEPHRO", "Néphrologie", "394589003"),
    ("NEURO", "Neurologie", "394591006"),
    ("ONCO", "Oncologie médicale", "394593009"),
)

HOSPITALS = (
    ("Hôpital Louis-Pasteur", "Paris", "75010", "12 rue Ambroise-Paré"),
    ("Hôpital Simone-Veil", "Saint-Denis", "93200", "2 avenue de la République"),
    ("Hôpital Marie-Curie", "Créteil", "94000", "40 avenue de Verdun"),
    ("Hôpital Jean-Jaurès", "Nanterre", "92000", "5 boulevard Émile-Zola"),
    ("Hôpital Georges-Brassens", "Argenteuil", "95100", "69 rue du Lieutenant-Colonel Prudhon"),
    ("Hôpital Olympe-de-Gouges", "Montreuil", "93100", "56 boulevard de la Boissière"),
)

FAMILY_NAMES = (
    "Martin", "Bernard", "Thomas", "Petit", "Robert", "Richard", "Durand", "Dubois", "Moreau", "Laurent", "Simon", "Michel",
    "Lefèvre", "Leroy", "Roux", "David", "Bertrand", "Morel", "Fournier", "Girard", "Bonnet", "Dupont", "Lambert", "Fontaine",
    "Rousseau", "Vincent", "Müller", "Lefort", "Mercier", "Boyer", "Blanc", "Guérin", "Faure", "André", "Gauthier", "Garcia",
    "Perrin", "Robin", "Clément", "Morin", "Nicolas", "Henry", "Roussel", "Mathieu", "Gautier", "Masson", "Marchand", "Duval",
    "Denis", "Dumont", "Marie", "Lemaire", "Noël", "Meyer", "Dufour", "Meunier", "Brun", "Blanchard", "Giraud", "Joly",
    "Rivière", "Lucas", "Brunet", "Gaillard", "Barbier", "Arnaud", "Martinez", "Gérard", "Roche", "Renard", "Schmitt", "Benali",
    "Nguyen", "Diallo", "Haddad", "Traoré", "Da Silva", "Ferreira", "Cohen", "Kaci",
)
GIVEN_FEMALE = ("Marie", "Jeanne", "Françoise", "Monique", "Catherine", "Nathalie", "Isabelle", "Sylvie", "Hélène", "Inès",
                "Camille", "Léa", "Chloé", "Zoé", "Aïcha", "Fatou", "Élise", "Thérèse", "Odile", "Josiane")
GIVEN_MALE = ("Jean", "Pierre", "Michel", "André", "Philippe", "Alain", "Bernard", "Jacques", "François", "Éric",
              "Nicolas", "Hugo", "Lucas", "Karim", "Mamadou", "Rémi", "Gérard", "Joël", "Noël", "Yves")

ALLERGIES = (
    ("Pénicillines", "764146007", "high"),
    ("Amoxicilline", "372687004", "high"),
    ("Iode (produits de contraste)", "293637006", "high"),
    ("Latex", "111088007", "low"),
    ("Aspirine", "293586001", "high"),
    ("Sulfamides", "387406002", "low"),
    ("Arachide", "91935009", "high"),
    ("Codéine", "261000", "low"),
)

PROBLEMS = (
    ("Hypertension artérielle", "38341003"),
    ("Diabète de type 2", "44054006"),
    ("Insuffisance cardiaque", "84114007"),
    ("Fibrillation auriculaire", "49436004"),
    ("BPCO", "13645005"),
    ("Insuffisance rénale chronique", "709044004"),
    ("Pneumopathie", "233604007"),
    ("Cirrhose", "19943007"),
    ("Accident vasculaire cérébral", "230690007"),
    ("Cancer du côlon", "363406005"),
)


@dataclass(frozen=True)
class Drug:
    name: str
    atc: str
    dose: str
    times: tuple[str, ...]  # administration times of day
    route: str = "Voie orale"
    #: SNOMED CT codes an allergy to it would be recorded under, as in ALLERGIES: its substance and the classes it
    #: belongs to (amoxicillin is a penicillin). The formulary's Medication lists them (clinical/prescribing.py)
    allergens: tuple[str, ...] = ()


DRUGS = (
    Drug("Paracétamol 1 g comprimé", "N02BE01", "1 comprimé", ("06:00", "12:00", "18:00", "00:00")),
    Drug("Énoxaparine 4000 UI/0,4 mL injectable", "B01AB05", "1 injection sous-cutanée", ("20:00",), "Voie sous-cutanée"),
    Drug("Furosémide 40 mg comprimé", "C03CA01", "1 comprimé", ("08:00",)),
    Drug("Bisoprolol 2,5 mg comprimé", "C07AB07", "1 comprimé", ("08:00",)),
    Drug("Ramipril 5 mg gélule", "C09AA05", "1 gélule", ("08:00",)),
    Drug("Metformine 1000 mg comprimé", "A10BA02", "1 comprimé", ("08:00", "20:00")),
    Drug("Insuline asparte", "A10AB05", "selon protocole", ("07:30", "12:00", "19:00"), "Voie sous-cutanée"),
    Drug("Amoxicilline 1 g comprimé", "J01CA04", "1 comprimé", ("08:00", "16:00", "00:00"), allergens=("372687004", "764146007")),
    Drug("Ceftriaxone 1 g injectable", "J01DD04", "1 g en IV", ("10:00",), "Voie intraveineuse"),
    Drug("Oméprazole 20 mg gélule", "A02BC01", "1 gélule", ("08:00",)),
    Drug("Apixaban 5 mg comprimé", "B01AF02", "1 comprimé", ("08:00", "20:00")),
    Drug("Chlorure de potassium 600 mg gélule", "A12BA01", "1 gélule", ("08:00", "20:00")),
    Drug("Morphine 10 mg comprimé LP", "N02AA01", "1 comprimé", ("08:00", "20:00")),
    Drug("Lévothyroxine 75 µg comprimé", "H03AA01", "1 comprimé", ("07:00",)),
)

#: the rest of the demo formulary: prescribed in the web app, never drawn by the seed (DRUGS alone keeps the same demo)
MORE_DRUGS = (
    Drug("Acide acétylsalicylique 75 mg sachet", "B01AC06", "1 sachet", ("12:00",), allergens=("293586001",)),
    Drug("Cotrimoxazole 800 mg/160 mg comprimé", "J01EE01", "1 comprimé", ("08:00", "20:00"), allergens=("387406002",)),
    Drug("Codéine/paracétamol 30 mg/500 mg comprimé", "N02AJ06", "1 comprimé", ("08:00", "14:00", "20:00"), allergens=("261000",)),
    Drug("Iohexol 300 mg I/mL injectable", "V08AB02", "selon l'examen", ("10:00",), "Voie intraveineuse", allergens=("293637006",)),
    Drug("Kétoprofène 100 mg comprimé LP", "M01AE03", "1 comprimé", ("20:00",)),
    Drug("Morphine 10 mg/mL injectable", "N02AA01", "selon protocole", ("08:00",), "Voie sous-cutanée"),
    Drug("Ondansétron 4 mg comprimé orodispersible", "A04AA01", "1 comprimé", ("08:00",)),
    Drug("Tramadol 50 mg gélule", "N02AX02", "1 gélule", ("08:00", "14:00", "20:00")),
)


@dataclass(frozen=True)
class LabTest:
    loinc: str
    name: str
    unit: str
    low: float
    high: float
    typical: float
    spread: float
    decimals: int = 1


LABS = (
    LabTest("2823-3", "Potassium", "mmol/L", 3.5, 5.0, 4.2, 0.5),
    LabTest("2951-2", "Sodium", "mmol/L", 135, 145, 139, 3.5, 0),
    LabTest("2160-0", "Créatinine", "µmol/L", 60, 110, 85, 25, 0),
    LabTest("718-7", "Hémoglobine", "g/dL", 12.0, 17.0, 13.5, 1.6),
    LabTest("6690-2", "Leucocytes", "10*9/L", 4.0, 10.0, 7.0, 2.4),
    LabTest("777-3", "Plaquettes", "10*9/L", 150, 400, 250, 70, 0),
    LabTest("1988-5", "Protéine C réactive", "mg/L", 0, 5, 8, 12),
    LabTest("2345-7", "Glucose", "mmol/L", 3.9, 6.1, 5.6, 1.4),
)

VITALS = (
    ("8867-4", "Fréquence cardiaque", "/min", 55, 100, 78, 12, 0),
    ("8480-6", "Pression artérielle systolique", "mm[Hg]", 100, 140, 128, 15, 0),
    ("8462-4", "Pression artérielle diastolique", "mm[Hg]", 60, 90, 74, 9, 0),
    ("8310-5", "Température corporelle", "Cel", 36.0, 38.0, 37.0, 0.5, 1),
    ("59408-5", "Saturation en oxygène", "%", 94, 100, 96, 2, 0),
    ("9279-1", "Fréquence respiratoire", "/min", 12, 20, 16, 3, 0),
)

IMAGING = (
    ("CR", "36643-5", "Radiographie thoracique de face",
     "Opacité alvéolaire basale droite compatible avec une pneumopathie. Pas d'épanchement."),
    ("CT", "24627-2", "Scanner thoracique", "Pas d'embolie pulmonaire. Emphysème centrolobulaire des apex."),
    ("CT", "30799-1", "Scanner abdomino-pelvien", "Épaississement pariétal colique sigmoïdien. Pas de collection."),
    ("US", "24531-6", "Échographie rénale", "Reins de taille normale, pas de dilatation des cavités pyélocalicielles."),
    ("MR", "24590-2", "IRM cérébrale", "Lésion ischémique récente du territoire sylvien gauche."),
)

NOTES = (
    ("Observation médicale d'entrée", "Patient admis pour altération de l'état général. Constantes stables. Bilan en cours."),
    ("Note d'évolution", "Évolution favorable sous traitement. Apyrexie depuis 24 h. Poursuite de la surveillance."),
    ("Transmissions infirmières", "Nuit calme. Douleur évaluée à 2/10. Alimentation reprise, bonne tolérance."),
    ("Avis spécialisé", "Pas d'indication chirurgicale à ce stade. À réévaluer selon le bilan de contrôle."),
)

DOWNTIME_PROCEDURES = (
    ("downtime-procedure", "Procédure dégradée : panne du système d'information",
     "# Panne du système d'information\n\n1. Prévenir la cellule de crise (poste 5555).\n"
     "2. Imprimer ou récupérer le dernier dossier de secours du service (« as of » indiqué en couverture).\n"
     "3. Tracer prescriptions, administrations et constantes sur les formulaires papier pré-remplis.\n"
     "4. Transmettre les demandes d'examens par formulaire papier et coursier.\n"
     "5. Au retour du système, saisir les données papier et faire valider par un second soignant.\n"),
    ("downtime-procedure", "Procédure dégradée : coupure du lien avec le site central",
     "# Site central injoignable\n\nLe nœud de site continue de servir le dossier et accepte les saisies urgentes.\n"
     "Vérifier le bandeau de fraîcheur des données. Signaler tout conflit à la cellule de crise.\n"),
    ("procedure", "Conduite à tenir : hyperkaliémie",
     "# Hyperkaliémie\n\nK+ > 6 mmol/L : ECG immédiat, appel du médecin de garde, contrôle sur prélèvement non hémolysé.\n"),
    ("procedure", "Identitovigilance : vérification de l'identité",
     "# Identité\n\nVérifier nom, prénom, date de naissance et IPP avant tout acte, à l'aide du bracelet.\n"),
)
