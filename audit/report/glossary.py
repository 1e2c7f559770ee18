"""The report's glossary: every term a reader may not know, in one or two plain sentences.

Terms on the page link here (`#term-<anchor>`); the glossary closes the page. Entries
are plain text written by us (no user data), escaped by the template like everything else.
"""

from __future__ import annotations

GLOSSARY: list[tuple[str, str, str]] = [
    ("clean", "Clean accuracy", "The share of test images the model classifies correctly when no one attacks them."),
    ("robust", "Robust accuracy",
     "The share of test images that are classified correctly and stay correct after an attack changes each pixel by at "
     "most ε. Attacks can only show that a model is weaker; a stronger attack could lower this number further."),
    ("eps", "ε (budget)", "How much the attacker may change each pixel. 8/255 means up to 8 of the 255 brightness steps, "
     "invisible to most people."),
    ("ensemble", "Ensemble (all attacks combined)",
     "An image counts as robust only if it survives every attack that ran: the worst case for each image."),
    ("fgsm", "FGSM", "Fast Gradient Sign Method: one step in the direction that most increases the model's error."),
    ("pgd", "PGD", "Projected Gradient Descent: many small FGSM-like steps from a random start inside the ε-ball; the "
     "standard strong white-box attack."),
    ("cw", "CW", "Carlini–Wagner style attack: PGD on the margin between the true class's score and the best other "
     "class's score."),
    ("tpgd", "TPGD", "Temperature-PGD: PGD on the model's softened (temperature-scaled) probabilities; it tends to widen "
     "the gaps between classes."),
    ("square", "Square", "A black-box attack that only queries the model's outputs and tries random square patches."),
    ("fmn", "FMN", "Fast Minimum-Norm attack: finds, per image, the smallest change that fools the model; gives the "
     "robustness curves."),
    ("autoattack", "AutoAttack", "The standard benchmark suite of attacks (APGD-CE, APGD-T, FAB-T, Square)."),
    ("worst", "Worst class", "The class with the lowest accuracy: the one an attacker would pick."),
    ("worst10", "Worst-10%", "The mean accuracy of the least robust tenth of the classes (shown from 50 classes on)."),
    ("nsd", "NSD", "Normalised standard deviation: the population standard deviation of the class accuracies divided by "
     "their mean. 0 means every class is equally robust; lower is fairer."),
    ("pp", "pp (percentage points)", "The difference between two percentages: 20% to 25% is +5 pp (not +25%)."),
    ("wilson", "95% interval (Wilson)",
     "The range that holds the true accuracy with 95% confidence, given how many test images were scored (Wilson score "
     "interval). Few images give a wide range."),
    ("significant", "Significantly below average",
     "The whole 95% interval of a class lies below the class average, so sampling noise does not explain the gap."),
    ("mcnemar", "McNemar test",
     "A paired test for two models on the same images: it counts the images only one of them gets right. A small p "
     "(below 0.05) means the difference is unlikely to be chance."),
    ("paired", "Paired interval (bootstrap)",
     "A 95% interval for a difference between two models measured on the same images, from resampling the images "
     "10,000 times (paired bootstrap): each resample keeps each image's outcome under both models together."),
    ("pvalue", "p-value", "The chance of a difference at least this large if the two models were equally good."),
    ("flipped", "0% (every image flipped)",
     "A class at 0% robust accuracy: every test image of that class that the model classified correctly was turned into "
     "a wrong prediction by an attack."),
    ("realizable", "Realizable",
     "A failure found by the attack that still fools the shipped model after the adversarial image is saved as 8-bit "
     "pixels and replayed."),
    ("digest", "Results digest", "The sha256 of results.json exactly as written: `sha256sum results.json` prints the "
     "same value, so a reader can check this page speaks for that file."),
    ("absld", "ABSLD", "Adaptive Balanced Soft-Label Distillation: trains a student from a robust teacher and gives each "
     "class its own teacher temperature, sharper labels for harder classes, so weak classes get more attention."),
    ("rslad", "RSLAD", "Robust Soft-Label Adversarial Distillation: ABSLD without the per-class temperatures (one for all)."),
    ("temperature", "Temperature (τ)", "Divides the teacher's scores before the softmax: below 1 sharpens the soft "
     "labels, above 1 flattens them. ABSLD keeps each class's τ within fixed bounds."),
    ("heldout", "Held-out validation images",
     "Training images set aside per class before training; the kept epoch is chosen on them, never on the test set."),
]


def glossary() -> list[dict]:
    return [{"anchor": anchor, "term": term, "definition": definition} for anchor, term, definition in GLOSSARY]


TERM_ANCHORS = {anchor for anchor, _, _ in GLOSSARY}


def term_anchor(name: str) -> str | None:
    """The glossary anchor of an attack or method name ("pgd" -> "pgd"), or None."""
    key = str(name).strip().lower().split("_")[0].split("-")[0]
    return key if key in TERM_ANCHORS else None
