"""Tiny, schema-valid results dicts for the report tests, built in code.

Everything is derived from a seeded random.Random, so a fixture is the same on every
machine (the gold file depends on it). Numbers are internally consistent: accuracies
are correct/n, CIs are Wilson intervals, the ensemble is no better than any attack
and target-flow rows add up to the fooled images.
"""

from __future__ import annotations

import base64
import hashlib
import math
import random
import struct
import zlib

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
XSS_CLASS = "<img src=x onerror=alert(1)>"


def wilson_ci(correct: int, n: int, z: float = 1.959963984540054) -> list:
    if n == 0:
        return [None, None]
    p = correct / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return [round(max(0.0, centre - half), 6), round(min(1.0, centre + half), 6)]


def class_entry(name: str, correct: int, n: int) -> dict:
    return {"class": name, "n": n, "correct": correct, "accuracy": round(correct / n, 6) if n else None,
            "ci95": wilson_ci(correct, n)}


def summarise(per_class: list, description: str, n_attacked: int, seconds: float) -> dict:
    """An attack block from its per-class entries (avg, worst, NSD as in the schema)."""
    accuracies = [entry["accuracy"] for entry in per_class]
    avg = sum(accuracies) / len(accuracies)
    worst_entry = min(per_class, key=lambda entry: entry["accuracy"])
    population_sd = math.sqrt(sum((a - avg) ** 2 for a in accuracies) / len(accuracies))
    worst10 = None
    if len(per_class) >= 50:
        k = math.ceil(len(per_class) / 10)
        worst10 = round(sum(sorted(accuracies)[:k]) / k, 6)
    return {"per_class": per_class, "avg": round(avg, 6), "worst": worst_entry["accuracy"],
            "worst_class": worst_entry["class"], "worst10": worst10,
            "nsd": round(population_sd / avg, 6) if avg else None,
            "n_attacked": n_attacked, "seconds": seconds, "description": description}


def tiny_png(width: int, height: int, seed: int) -> str:
    """A base64 RGB PNG of seeded noise (noise compresses worst: a size upper bound)."""
    rng = random.Random(seed)
    raw = b"".join(b"\x00" + bytes(rng.randrange(256) for _ in range(width * 3)) for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    return base64.b64encode(png).decode("ascii")


ATTACK_DESCRIPTIONS = {
    "fgsm": ("FGSM", {}, "FGSM(eps=8/255)"),
    "pgd": ("PGD", {"steps": 20, "step_size": 0.00784, "random_start": True},
            "PGD(eps=8/255, steps=20, step_size=2/255)"),
    "cw": ("CW", {"steps": 30, "kappa": 0.0}, "CW(eps=8/255, steps=30)"),
    "tpgd": ("TPGD", {"steps": 10}, "TPGD(eps=8/255, steps=10)"),
    "square": ("Square", {"queries": 1000}, "Square(eps=8/255, queries=1000)"),
}


def make_results(*, classes=("airplane", "automobile", "bird"), attacks=("fgsm", "pgd"), n_per_class=20,
                 examples_per_class=1, image_size=8, seed=0, ensemble=True, checks=True, training=False,
                 model_path="/home/alice/models/resnet18.pt2", data_source="/srv/datasets/cifar10",
                 strength=1.0) -> dict:
    """A complete results.json dict. `strength` > 1 makes the model more robust
    (used to build a plausible AFTER for comparison mode)."""
    rng = random.Random(seed)
    classes = list(classes)
    num_classes = len(classes)
    clean_correct = [rng.randint(int(0.7 * n_per_class), n_per_class) for _ in classes]
    survivors = list(clean_correct)
    attack_blocks = {"clean": summarise([class_entry(c, k, n_per_class) for c, k in zip(classes, clean_correct)],
                                        "Clean()", 0, 0.5)}
    robust = {}
    target_flow = {}
    for position, name in enumerate(attacks):
        kept = []
        for k, before in enumerate(clean_correct):
            fraction = min(1.0, strength * rng.uniform(0.15, 0.75) / (1 + 0.3 * position))
            kept.append(min(before, int(round(before * fraction))))
        robust[name] = kept
        survivors = [min(a, b) for a, b in zip(survivors, kept)]
        attack_blocks[name] = summarise([class_entry(c, k, n_per_class) for c, k in zip(classes, kept)],
                                        ATTACK_DESCRIPTIONS.get(name, (name, {}, name))[2],
                                        sum(clean_correct), round(1.5 + position, 1))
        matrix = []
        for source in range(num_classes):
            fooled = clean_correct[source] - kept[source]
            row = [0] * num_classes
            for _ in range(fooled):
                target = rng.randrange(num_classes - 1)
                row[target + (target >= source)] += 1
            matrix.append(row)
        target_flow[name] = matrix
    ensemble_block = None
    if ensemble and attacks:
        ensemble_block = summarise([class_entry(c, k, n_per_class) for c, k in zip(classes, survivors)],
                                   f"Ensemble({', '.join(attacks)})", sum(clean_correct),
                                   round(sum(b["seconds"] for b in attack_blocks.values()), 1))
        ensemble_block["attacks"] = list(attacks)
    order = sorted(range(num_classes), key=lambda k: survivors[k])
    examples = []
    for k in order[:3]:
        for e in range(examples_per_class):
            attack = attacks[e % len(attacks)] if attacks else "clean"
            target = (k + 1 + e) % num_classes
            examples.append({
                "attack": attack, "index": 100 * k + e, "class": classes[k], "clean_pred": classes[k],
                "adv_pred": classes[target],
                "clean_png": tiny_png(image_size, image_size, seed * 1000 + 2 * (100 * k + e)),
                "adv_png": tiny_png(image_size, image_size, seed * 1000 + 2 * (100 * k + e) + 1),
            })
    config_attacks = {"clean": {"class": "Clean", "repr": "Clean()"}}
    for name in attacks:
        cls, params, description = ATTACK_DESCRIPTIONS.get(name, (name, {}, name))
        config_attacks[name] = {"class": cls, **params, "repr": description}
    results = {
        "schema_version": 1,
        "tool": {"name": "robaudit", "version": "0.1.0"},
        "command": f"robaudit scan {model_path} --dataset cifar10 --data-dir={data_source} --eps 8/255 "
                   f"--out /home/alice/runs/audit1",
        "started_at": "2026-11-22T12:00:00+00:00", "finished_at": "2026-11-22T12:00:40+00:00",
        "model": {
            "path": model_path, "format": "export",
            "sha256": hashlib.sha256(f"model-{seed}-{strength}".encode()).hexdigest(), "num_params": 11173962,
            "arch": "resnet18", "white_box": True,
            "adaptations": {"normalize": {"mean": [0.4914, 0.4822, 0.4465], "std": [0.247, 0.2435, 0.2616]},
                            "onnx": None},
        },
        "dataset": {
            "name": "cifar10", "split": "test", "n": n_per_class * num_classes, "num_classes": num_classes,
            "classes": classes, "source": data_source,
            "subset": {"limit": None, "n_per_class": n_per_class, "total_in_split": 10000},
        },
        "config": {
            "eps": 0.031373, "eps_255": 8.0, "seed": seed, "device": "cpu", "batch_size": 256,
            "scoring": {"iterates": "any", "score": "robust"}, "attacks": config_attacks,
        },
        "attacks": attack_blocks,
        "ensemble": ensemble_block,
        "target_flow": target_flow,
        "examples": examples,
        "checks": [
            {"id": "near_chance", "severity": "info", "message": "Clean accuracy is well above chance.",
             "why": "A model near chance has nothing to attack; robust accuracy would mean nothing."},
            {"id": "fgsm_beats_pgd", "severity": "warning",
             "message": f"FGSM fooled 3 points that PGD did not (model file {model_path}).",
             "why": "A one-step attack beating a multi-step one is a classic sign of gradient masking."},
        ] if checks else [],
        "timing": {"total_seconds": 40.1, "per_attack": {name: attack_blocks[name]["seconds"] for name in attacks}},
        "environment": {"python": "3.11.7", "torch": "2.14.1", "robaudit": "0.1.0", "onnxruntime": "1.20.0",
                        "pyautoattack": "0.2.0", "plotly": "7.1.0", "platform": "Linux-x86_64",
                        "device": "cpu", "device_name": "cpu", "world_size": 1},
        "notes": ["A point counts as robust only if clean-correct and not fooled at any iterate.",
                  "NSD = population SD (ddof 0) / mean of class accuracies."],
    }
    if training:
        epochs = 4
        results["training"] = {
            "method": "absld", "teacher": "/home/alice/models/teacher.pt2", "epochs": epochs,
            "options": {"lr": 0.01, "beta": 6.0},
            "curves": [{"epoch": e + 1, "loss": round(1.2 - 0.2 * e, 4), "val_clean_avg": round(0.6 + 0.05 * e, 4),
                        "val_robust_avg": round(0.3 + 0.03 * e, 4), "val_robust_worst": round(0.1 + 0.04 * e, 4)}
                       for e in range(epochs)],
            "temperatures": {
                "tau_adv": [[round(1.0 + 0.1 * e * (k + 1) / num_classes, 4) for k in range(num_classes)]
                            for e in range(epochs)],
                "tau_nat": [[round(1.0 - 0.05 * e * (k + 1) / num_classes, 4) for k in range(num_classes)]
                            for e in range(epochs)],
            },
            "class_weights": None,
        }
    return results


def set_accuracy(results: dict, attack: str, class_name: str, correct: int) -> None:
    """Change one class's correct count under `attack` and recompute the block summary."""
    block = results["ensemble"] if attack == "ensemble" else results["attacks"][attack]
    entries = block["per_class"]
    position = next(i for i, entry in enumerate(entries) if entry["class"] == class_name)
    entries[position] = class_entry(class_name, correct, entries[position]["n"])
    extra = {key: block[key] for key in ("attacks",) if key in block}
    block.update(summarise(entries, block["description"], block["n_attacked"], block["seconds"]), **extra)


def cifar10_scale_results(seed: int = 0) -> dict:
    """A CIFAR-10-size audit: 10 classes, 5 attacks, 1,000 images, 30 32x32 examples."""
    return make_results(classes=CIFAR10_CLASSES, attacks=("fgsm", "pgd", "cw", "tpgd", "square"),
                        n_per_class=100, examples_per_class=10, image_size=32, seed=seed)
