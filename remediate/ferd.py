"""Data-free remediation: FERD (Li et al. 2025), robust distillation from the teacher alone.

For users who have the model (often as ONNX) and at most a test set, not the training data.
`run_ferd` synthesises the training images and distils a robust, fairer student from them; the
test set is only audited at the end (engine.run_scan), never trained or selected on. Formulas:
the FERD section of ../shared/specs/methods.md (paper first, the authors' code github
mayaobuduyao/FERD where it is silent: marked (code), read not copied); (ours) where both are.
Epochs are numbered from 1; the first `warmup` run steps 1-3 only.

1. Generator phase. A generator (z in R^nz -> Linear -> BN -> up x2 -> conv 2*ngf -> BN ->
   LeakyReLU(0.2) -> up x2 -> conv ngf -> BN -> LeakyReLU(0.2) -> conv 3 -> sigmoid; ngf 64, nz
   100), re-initialised every epoch, trains `g_steps` (200) Adam steps (lr 2e-3, betas (0.5,
   0.999); the codes z too, lr 0.015) on  L_G = 5 L_bn + L_oh - L_adv + 5 L_uni  for
   `synthesis_batch_size` (256, test.sh) labels drawn from p; the lowest-L_G batch goes to the
   bank. Images are augmented (crop pad 4 + flip) before teacher and student when cfg.augment.
   - L_bn (DeepInversion): sum over the teacher's BatchNorm layers of ||mu(h) - running_mean||_2
     + ||var(h) - running_var||_2, h the layer input (biased variance). Needs hookable
     nn.BatchNorm modules (weights files, onnx2torch graphs that kept them); torch.export /
     TorchScript hide them and ONNX exports usually fold them: then off, with a note.
   - L_oh: cross-entropy of the teacher on the sampled labels.
   - L_adv (option `generator_adv_loss`): "ikl" (default; IBD_module_cmi.py -dkl_loss): the
     batch mean of IKL(s, t) = 0.25 sum_ij w_ij ((t_i - t_j) - (s_i - s_j))^2 / sum_ij w_ij
     + CE(softmax(t), log_softmax(s)), w = p p^T, p = softmax(t / 100) (losses.py dkl_loss, GI
     off: the CE target detached, the pair term differentiated on both sides (code); the code
     divides by the batch's sum of w, we by each sample's, equal up to rounding as each is 1);
     "kl": KL(softmax(t) || softmax(s)). Student in eval mode.
   - L_uni (Fairness-Aware Examples, option `fae`): batch-mean KL(uniform || softmax(teacher on
     its non-robust features)). Option `nonrobust`:
     "ib" (default; models/IFP.py, remediate/ferd_ib.py): on every generator step, Z = f_l(x) at
     an intermediate teacher layer (auto: the final feature map, the code's pop 3; or
     `ib_layer`), noise scales s = softplus(lambda) [B, C] from `ib_steps` (50) Adam steps (lr
     0.1) on CE(f_{l+}(Z + s N), y) + 0.3 * 0.5 * mean_bc(v/s^2 + log(s^2/v) - 1) (code; the spec
     writes beta sum_c), N one N(0,1) per sample and channel (code) seeded by (seed, epoch);
     non-robust: s^2 <= the batch's largest spatial variance v (code: robust = s^2 > max v);
     L_uni reads f_{l+}(Z * m). A .pt2 teacher is first unflattened into hookable layers
     (remediate/ferd_export_taps.py). A teacher without such a layer (no spatial map;
     TorchScript) falls back to "fragility" with a note.
     "fragility" (ours, said so in training.options.notes): f the penultimate features (input
     of the last nn.Linear with C outputs, W, b); after each generator phase the teacher attack
     of step 3 gives fragility_c = mean|f_c(x') - f_c(x)| / (mean|f_c(x)| + 1e-12); the
     ceil(nonrobust_fraction * D) (0.5) most fragile channels form m; L_uni = KL(u || W(f*m)+b)
     from epoch 2 (epoch 1 has no measurement). Neither layer nor head: L_uni off, with a note.
   metrics.csv: gen_loss, gen_bn, gen_oh, gen_adv (the divergence, >= 0), gen_uni,
   gen_nonrobust_share and gen_teacher_agree (share of the best batch the teacher labels as
   sampled; under 0.5 on average the results carry a note on weakly class-specific data).
2. Bank (ours): best batches as uint8 with labels and unique ids (the code keeps floats), at
   most `bank_size` (50,000) images; once full a new batch replaces the oldest
   (`bank_eviction="oldest"`) or random slots seeded by (seed, epoch) (`"random"`).
3. Class reweighting (option `reweight`): PGD-`teacher_steps` (20) on the teacher (CE on the
   sampled labels, step cfg.step_size, uniform start) on the best batch; r_c = class-c mean of
   max_{j != c} z_j(x') - z_c(x'); min-max normalised to [0.05, 0.2], renormalised: next p (a
   class absent takes the present ones' mean r (ours); equal r: uniform). float64 class_sums.
4. Student (from epoch warmup + 1): `kd_steps` (400) SGD steps on cfg.batch_size bank images
   (a seeded permutation per pass; crop + flip). t = teacher logits on the clean x; UTAE x' from
   x + 0.001 N(0,1), cfg.steps (10) sign steps of cfg.step_size, student in eval, ascending
   KL(softmax(t) || s(x')) - gamma KL(uniform || s(x')), gamma = `uta_gamma` 0.3 (ours, inside
   the paper's 0.1-0.5; gamma 0 = the code's query_sample.py, as `uta=false`). Then, in train
   mode, L_S = loss_scale * (5/6 D(s(x), t) + 1/6 D(s(x'), t)) (alpha = 1/6), D the batch-mean
   IKL (`student_loss="ikl"`, paper) or KL ("kl"); loss_scale 1. The code's test.py calls the
   generator's -KL here; not copied (spec). SGD lr cfg.lr, momentum, weight decay; cosine
   annealing with T_max = all cfg.epochs, stepped after every epoch, warm-up included (code).
   FERD's own RemediateConfig defaults (code): weight_decay 5e-4, batch_size 256
   (FERD.paper_schedule, FERD's only schedule: the CLI applies it whenever the user sets nothing);
   a run that differs says so in the notes.

Defaults: 220 epochs, 20 warm-up (the spec); E != 220 epochs without `warmup` keeps the
fraction, round(20 E / 220), at most E - 1. fae, reweight and uta off: the plain data-free
robust distillation baseline. training.options.method records every option (uta_gamma,
student_loss, generator_adv_loss, nonrobust, ...) and what ran (nonrobust_active,
ib_layer_active, uta_gamma_active, bn_loss_active, fae_active).

Selection: no real images to hold out, so the last epoch's student is exported and audited.

Determinism: every draw is a function of (seed, epoch[, step]): generator init (forked RNG),
z and labels, IB noise, eviction and bank order (torch.Generator per epoch and purpose),
augmentation and attack starts (robaudit.audit.rng keyed by bank id). The checkpoint (atomic,
every epoch) holds student, optimizer, scheduler, bank, p, fragility mask, generator, history
and RNG state: N epochs straight equal K + --resume + N - K bitwise on CPU.

One process only (the generator phase is not distributed): under torchrun `run_ferd` refuses.
Options: remediate/ferd_options.py; generator, loss terms, hooks, bank and phases:
remediate/ferd_synthesis.py; the information bottleneck: remediate/ferd_ib.py; this module
registers the trainer `ferd` and runs the epochs through remediate/common.py, checkpoints.py
and export.py.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from robaudit.audit import distributed
from robaudit.audit.attacks.ascent import projected_ascent
from robaudit.audit.modes import eval_mode
from robaudit.audit.rng import per_sample_normal
from robaudit.errors import UserError
from robaudit.remediate.base import METHODS, TALLY_DTYPE, ClassState, Trainer, class_sums, tensor_list
from robaudit.remediate.checkpoints import (CHECKPOINT_KIND, CHECKPOINT_VERSION, prepare_out_dir_for_resume,
                                            restore_rng_state, rng_state, save_atomic, write_metrics_csv)
from robaudit.remediate.loss_window import LossWindow, loss_check_interval
from robaudit.remediate.common import (RemediateConfig, Runtime, audit_student, augment_batch, ready_student,
                                       output_classes, resolve_runtime, training_block)
from robaudit.remediate.export import export_student
from robaudit.remediate.ferd_ib import InformationBottleneck, nonrobust_source
from robaudit.remediate.ferd_options import (CONFIG_DEFAULTS, METHOD_NAME, PAPER_EPOCHS, FerdOptions,
                                             checked_class_names, checked_image_shape, checked_options,
                                             checked_schedule, config_default_notes)
from robaudit.remediate.ferd_synthesis import (PURPOSE_BANK_ORDER, PURPOSE_EVICT, FerdGenerator, SyntheticBank,
                                               TeacherTaps, class_probabilities, distillation_divergence,
                                               generator_phase, new_generator, synthetic_example_grid,
                                               teacher_robustness, torch_generator, uta_attack_loss)

log = logging.getLogger(__name__)

GAUSSIAN_START_STD = 0.001          # the student's attack starts at x + 0.001 N(0,1) (RSLAD)
STREAM_STUDENT_START = (1 << 28) + (1 << 24)        # + round (robaudit.audit.rng; see ferd_synthesis)
LOW_TEACHER_AGREEMENT = 0.5   # below this mean share the synthetic images are called weakly class-specific
SCHEDULE = "cosine over all epochs, stepped every epoch (warm-up included)"   # test.py (code)

CLASS_PROBABILITIES = ClassState(
    "class_probs", "Class sampling probability of synthetic labels (FERD; more for less robust classes)",
    name="class_probabilities")


@METHODS.register("ferd", help="FERD (Li et al. 2025): data-free robust distillation from the teacher alone")
class FERD(Trainer):
    """The data-free trainer: synthesises its training images from the teacher (see the module doc).

    An instance describes one run to training_block (its options and what it learns per class).
    """

    name = METHOD_NAME
    needs_teacher = True
    needs_training_data = False
    default_epochs = PAPER_EPOCHS
    # FERD's only schedule (test.py / test.sh): cosine over all epochs (milestones None), so
    # `--schedule shared` does not apply to it.
    paper_schedule = {"epochs": PAPER_EPOCHS, "lr": 0.1, "milestones": None, **CONFIG_DEFAULTS,
                      "source": "the FERD authors' test.py / test.sh: SGD 0.1, weight decay 5e-4, batch 256, "
                                "cosine over all epochs"}
    shared_schedule = False
    lr_milestones: Tuple[int, ...] = ()   # cosine schedule, no milestones

    def __init__(self, options: Optional[dict] = None):
        self._options = dict(options or {})

    @classmethod
    def option_names(cls) -> List[str]:
        return sorted(FerdOptions.names())

    @classmethod
    def shortcut_options(cls) -> List[str]:
        return ["alpha"]   # FERD's reweight/beta mean other things than the shared flags'

    @classmethod
    def check_config(cls, cfg, world_size: int = 1) -> None:
        if getattr(cfg, "norm", "linf") != "linf":   # its synthesis and attacks are the paper's L-inf ones
            raise UserError(f"method ferd trains under --norm linf only (its data-free synthesis and teacher "
                            f"attack are L-inf); drop --norm {cfg.norm} or pick another method")
        checked_schedule(cfg, FerdOptions.from_mapping(cfg.method_options))

    @classmethod
    def run(cls, cfg, *, teacher, train_data=None, test_data=None, student_module=None, dry_run=False):
        # No training data: whatever train_data holds is not used (the test split is only audited).
        return run_ferd(cfg, teacher=teacher, test_data=test_data, student_module=student_module, dry_run=dry_run)

    def options(self) -> dict:
        return self._options

    def class_state(self) -> Tuple[ClassState, ...]:
        return (CLASS_PROBABILITIES,)


def _class_means(sums: torch.Tensor, counts: torch.Tensor) -> List[Optional[float]]:
    nan = torch.full_like(counts, float("nan"))
    return tensor_list(torch.where(counts > 0, sums / counts.clamp_min(1.0), nan))


# ============================================================================ the run
def run_ferd(cfg: RemediateConfig, *, teacher, test_data=None, student_module: Optional[nn.Module] = None,
             classes: Optional[Sequence[str]] = None, dry_run: bool = False) -> Optional[dict]:
    """Distil a robust student from `teacher` (a LoadedModel) alone, with FERD; export it and,
    given `test_data` (an EvalData), audit it with engine.run_scan into out_dir/student/.

    cfg is a RemediateConfig: its method_options are FerdOptions (fae, reweight, uta, ...;
    see FerdOptions), cfg.method must be "ferd" (or the default, which is ignored);
    epochs, lr, momentum, weight_decay, batch_size (student), eps, steps, step_size
    (student attack; the teacher attack uses step_size too), augment, seed, device,
    precision, resume, export_formats and the audit_* fields mean what they mean for
    run_remediate. There is no validation split (val_* are ignored) and the schedule is
    cosine (cfg.milestones must be None). `classes` names the classes (default: the test
    set's, else the teacher's, else "0".."C-1"). Returns the same summary as
    run_remediate (best / best_score None: the last epoch is selected). dry_run=True: every
    check on the options, the models and an existing checkpoint, nothing written, None returned.
    """
    opts, warmup = checked_options(cfg, teacher)
    runtime = resolve_runtime(cfg, distributed.current())
    image_shape = checked_image_shape(opts, test_data)
    teacher_module = teacher.module
    teacher_module.eval()
    example = torch.zeros(2, *image_shape, device=runtime.device)
    if opts.fae and opts.uni_weight > 0 and not dry_run:   # .pt2 teachers: layers made hookable
        from robaudit.remediate.ferd_export_taps import hookable_teacher

        probe = torch.rand(2, *image_shape, generator=torch.Generator().manual_seed(int(cfg.seed))).to(runtime.device)
        teacher_module, note = hookable_teacher(teacher_module, probe)
        if note is not None:
            log.warning("ferd: %s", note)
    num_classes = output_classes(teacher_module, example)
    classes = checked_class_names(classes, test_data, teacher, num_classes)
    student, student_desc = ready_student(cfg, student_module, num_classes, runtime, example,
                                          classes_from="the teacher")
    run = _FerdRun(cfg=cfg, opts=opts, warmup=warmup, teacher=teacher, teacher_module=teacher_module,
                   student=student, classes=classes, image_shape=image_shape, runtime=runtime,
                   fingerprint=_fingerprint(cfg, opts, warmup, num_classes, student_desc, image_shape, teacher))
    if dry_run:
        _resume_state(run, create=False)
        return None
    run.taps = TeacherTaps(teacher_module, num_classes)
    try:
        with run.runtime.training_policy():   # TF32 per --precision, cudnn.benchmark on CUDA
            return _train(run, test_data)
    finally:
        run.taps.close()
        if run.ib is not None:
            run.ib.close()


@dataclass
class _FerdRun:
    """One checked FERD run: its options, models, shapes and where it writes."""

    cfg: RemediateConfig
    opts: FerdOptions
    warmup: int
    teacher: object                       # the LoadedModel (path, sha256 for the results)
    teacher_module: nn.Module
    student: nn.Module
    classes: List[str]
    image_shape: Tuple[int, int, int]
    runtime: Runtime
    fingerprint: dict
    taps: Optional[TeacherTaps] = None
    ib: Optional[InformationBottleneck] = None   # set when L_uni reads the information bottleneck
    use_bn: bool = False
    use_fae: bool = False
    nonrobust_active: Optional[str] = None        # "ib" | "fragility" | None (L_uni off)
    ib_layer_name: Optional[str] = None

    @property
    def fragility_fae(self) -> bool:
        return self.use_fae and self.nonrobust_active == "fragility"

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.out_dir)


@dataclass
class _FerdState:
    """What changes from epoch to epoch (all of it in the checkpoint)."""

    optimizer: torch.optim.Optimizer
    scheduler: object
    bank: SyntheticBank
    probs: torch.Tensor
    mask: Optional[torch.Tensor] = None
    generator: Optional[FerdGenerator] = None   # the last epoch's (kept when reset_generator is off)
    history: List[dict] = None


def _resume_state(run: _FerdRun, *, create: bool) -> Optional[dict]:
    """The checkpoint to resume from (or None); refuses a data-based one. create=False writes nothing."""
    checkpoint_path = run.out_dir / "checkpoint.pt"
    state = prepare_out_dir_for_resume(run.out_dir, checkpoint_path, run.cfg.resume, run.fingerprint, create=create)
    if state is not None and not state.get("data_free"):
        raise UserError(f"{checkpoint_path} is a data-based remediation checkpoint; resume it without "
                        f"--data-free, or choose another --out")
    return state


def _loss_terms_available(run: _FerdRun) -> List[str]:
    """Sets run.use_bn / run.use_fae / run.nonrobust_active / run.ib from what the teacher exposes;
    the notes for what is off or substituted."""
    opts, num_classes = run.opts, len(run.classes)
    notes: List[str] = []
    probe = torch.rand(2, *run.image_shape, generator=torch.Generator().manual_seed(int(run.cfg.seed)))
    probe = probe.to(run.runtime.device)
    bn_available, head_available = run.taps.probe(run.teacher_module, probe)
    run.use_bn = bn_available and opts.bn_weight > 0
    if not bn_available:
        notes.append("DeepInversion BN-statistics loss off: the teacher has no BatchNorm layer robaudit can hook "
                     "(torch.export .pt2 and TorchScript files hide their layers; ONNX exports usually fold "
                     "BatchNorm into the convolutions); the generator trains on the one-hot, adversarial and "
                     "uniformity terms only. Pass the teacher's PyTorch weights (state_dict/checkpoint with "
                     "--arch) to use it.")
    if opts.fae and opts.uni_weight > 0:
        run.nonrobust_active, run.ib, source_notes = nonrobust_source(opts, run.teacher_module, probe,
                                                                     head_available, num_classes)
        run.ib_layer_name = run.ib.name if run.ib is not None else None
        notes.extend(source_notes)
    run.use_fae = run.nonrobust_active is not None
    notes.extend(config_default_notes(run.cfg))
    for note in notes:
        log.warning("ferd: %s", note)
    return notes


def _initial_state(run: _FerdRun) -> Tuple[_FerdState, int]:
    """(state, first epoch): fresh, or restored from the checkpoint with --resume."""
    cfg, opts = run.cfg, run.opts
    optimizer = torch.optim.SGD(run.student.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    # test.py: CosineAnnealingLR(T_max=epochs), stepped after every epoch, warm-up epochs included.
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    num_classes = len(run.classes)
    state = _FerdState(optimizer=optimizer, scheduler=scheduler, bank=SyntheticBank(opts.bank_size, opts.bank_eviction),
                       probs=torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float32), history=[])
    saved = _resume_state(run, create=True)
    if saved is None:
        return state, 1
    run.student.load_state_dict(saved["student"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    state.bank.load_state_dict(saved["bank"])
    state.probs = saved["class_probs"].float().clone()
    state.mask = saved["nonrobust_mask"].float().clone() if saved["nonrobust_mask"] is not None else None
    if not opts.reset_generator and saved.get("generator") is not None:
        state.generator = new_generator(opts, run.image_shape, cfg.seed, 0, run.runtime.device)
        state.generator.load_state_dict(saved["generator"])
    restore_rng_state(saved["rng"], run.runtime.device)
    state.history = saved["history"]
    start_epoch = int(saved["epoch"]) + 1
    log.info("resuming %s from epoch %d", run.out_dir, start_epoch)
    # checkpoint.pt is renamed into place before metrics.csv: a kill in between leaves
    # metrics.csv an epoch short, which no later epoch rewrites if it was the last one.
    write_metrics_csv(run.out_dir / "metrics.csv", state.history, run.classes)
    return state, start_epoch


def _train(run: _FerdRun, test_data) -> dict:
    cfg = run.cfg
    notes = _loss_terms_available(run)
    state, start_epoch = _initial_state(run)
    epoch_bar = tqdm(total=cfg.epochs, initial=start_epoch - 1, desc="ferd", unit="epoch", file=sys.stderr,
                     disable=not cfg.progress or None, dynamic_ncols=True)
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            entry = _epoch(run, state, epoch)
            state.history.append(entry)
            _write_checkpoint(run, state, epoch)
            epoch_bar.update(1)
            if entry["loss"] is not None:
                epoch_bar.set_postfix(loss=f"{entry['loss']:.4f}", bank=len(state.bank))
    finally:
        epoch_bar.close()

    run.student.eval()
    exports = (export_student(run.student, torch.zeros(1, *run.image_shape), run.out_dir, cfg.export_formats)
               if cfg.export_formats else {})
    history = state.history
    selected_epoch = history[-1]["epoch"] if history else None
    specificity = class_specificity_note(history, len(run.classes))
    if specificity is not None:
        log.warning("ferd: %s", specificity)
        notes.append(specificity)
    training = ferd_training_block(cfg, run.opts, run.warmup, run.teacher, history, selected_epoch, state.bank,
                                   run.classes, notes, use_bn=run.use_bn, use_fae=run.use_fae,
                                   nonrobust_active=run.nonrobust_active, ib_layer=run.ib_layer_name)
    summary = {
        "out_dir": str(run.out_dir), "method": METHOD_NAME, "epochs": len(history),
        "selected_epoch": selected_epoch, "best_score": None, "checkpoint": str(run.out_dir / "checkpoint.pt"),
        "best": None, "metrics": str(run.out_dir / "metrics.csv"), "exports": exports, "training": training,
        "student_results": None, "bank_size": len(state.bank),
    }
    if test_data is not None:
        summary["student_results"] = audit_student(cfg, exports, test_data, training, run.out_dir)
    return summary


def _epoch(run: _FerdRun, state: _FerdState, epoch: int) -> dict:
    """Generator phase -> bank -> teacher attack -> (after the warm-up) student phase; the epoch's entry."""
    cfg, opts, device, autocast = run.cfg, run.opts, run.runtime.device, run.runtime.autocast
    num_classes = len(run.classes)
    t_epoch = time.perf_counter()
    record: Dict[str, object] = {"phase": "warmup" if epoch <= run.warmup else "distill",
                                 "class_probs": tensor_list(state.probs)}
    # 1. generator phase -> best batch
    if opts.reset_generator or state.generator is None:
        state.generator = new_generator(opts, run.image_shape, cfg.seed, epoch if opts.reset_generator else 0,
                                        device)
    x_best, y_best, parts = generator_phase(
        state.generator, run.teacher_module, run.student, run.taps, state.probs,
        state.mask if run.fragility_fae else None, opts, cfg, epoch, run.image_shape, device, autocast,
        run.use_bn, run.use_fae, ib=run.ib if run.use_fae else None)
    record.update({"gen_loss": parts["total"], "gen_bn": parts["bn"], "gen_oh": parts["oh"],
                   "gen_adv": parts["adv"], "gen_uni": parts["uni"], "gen_teacher_agree": parts["teacher_agree"],
                   "gen_nonrobust_share": parts["nonrobust_share"]})
    # 2. bank
    ids = (epoch - 1) * opts.synthesis_batch_size + torch.arange(len(y_best))
    state.bank.add(x_best, y_best, ids, epoch, generator=torch_generator(cfg.seed, epoch, PURPOSE_EVICT))
    record["bank_size"] = len(state.bank)
    record["synthetic_count"] = [float(v) for v in torch.bincount(y_best.cpu(), minlength=num_classes)]
    # 3. teacher attack -> next class probabilities and non-robust channels
    if opts.reweight or run.fragility_fae:
        _reweight_from_teacher(run, state, x_best, y_best, ids, epoch, record)
    # 4. student
    entry = {"epoch": epoch, "lr": None, "loss": None}
    if epoch > run.warmup:
        entry["lr"] = state.optimizer.param_groups[0]["lr"]
        loss_mean, tally = _student_epoch(run.student, run.teacher_module, state.bank, state.optimizer, opts, cfg,
                                          epoch, num_classes, device, run.runtime.memory_format, autocast,
                                          state.history)
        entry["loss"] = loss_mean
        counts = tally[:, 0]
        record.update({"student_loss_adv": _class_means(tally[:, 1], counts),
                       "student_loss_nat": _class_means(tally[:, 2], counts),
                       "student_agree_adv": _class_means(tally[:, 3], counts),
                       "student_agree_nat": _class_means(tally[:, 4], counts)})
    with warnings.catch_warnings():     # warm-up epochs step the schedule without an optimizer step (code)
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
        state.scheduler.step()
    record["next_class_probs"] = tensor_list(state.probs)
    entry["world_size"] = 1
    entry["seconds"] = time.perf_counter() - t_epoch
    entry["method"] = record
    return entry


def _reweight_from_teacher(run: _FerdRun, state: _FerdState, x_best, y_best, ids, epoch: int, record: dict) -> None:
    """Step 3: the teacher attacked on the (8-bit) best batch sets the next labels' p and the channel mask."""
    device = run.runtime.device
    x_q = SyntheticBank.quantise(x_best).to(device).float().div_(255.0)
    stats = teacher_robustness(run.teacher_module, run.taps, x_q, y_best.to(device), ids.to(device), run.opts,
                               run.cfg, epoch, len(run.classes), run.runtime.autocast, run.fragility_fae)
    record["teacher_neg_margin"] = _class_means(stats["tally"][:, 1], stats["tally"][:, 0])
    record["teacher_syn_robust"] = _class_means(stats["tally"][:, 2], stats["tally"][:, 0])
    if run.opts.reweight:
        state.probs = class_probabilities(stats["tally"][:, 1], stats["tally"][:, 0], run.opts.prob_bounds).cpu()
    if run.fragility_fae and stats["mask"] is not None:
        state.mask = stats["mask"].cpu()
        record["nonrobust_channels"] = int(state.mask.sum())


def _write_checkpoint(run: _FerdRun, state: _FerdState, epoch: int) -> None:
    save_atomic({
        "kind": CHECKPOINT_KIND, "version": CHECKPOINT_VERSION, "data_free": True,
        "epoch": epoch, "student": run.student.state_dict(), "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(), "bank": state.bank.state_dict(),
        "class_probs": state.probs.clone(),
        "nonrobust_mask": state.mask.clone() if state.mask is not None else None,
        "generator": {k: v.detach().cpu().clone() for k, v in state.generator.state_dict().items()},
        "rng": rng_state(run.runtime.device),
        "best": {"epoch": None, "score": None}, "history": state.history, "fingerprint": run.fingerprint,
        "classes": run.classes,
    }, run.out_dir / "checkpoint.pt")
    write_metrics_csv(run.out_dir / "metrics.csv", state.history, run.classes)


def _student_epoch(student: nn.Module, teacher: nn.Module, bank: SyntheticBank, optimizer, opts: FerdOptions,
                   cfg, epoch: int, num_classes: int, device, memory_format, autocast,
                   history: List[dict]) -> Tuple[float, torch.Tensor]:
    """`kd_steps` distillation steps on bank batches; (mean loss, per-class tallies [C, 5] keyed by the
    teacher's clean prediction: count, student_loss divergence (IKL or KL) on x', on x, student
    agrees on x', agrees on x)."""
    order_rng = torch_generator(cfg.seed, epoch, PURPOSE_BANK_ORDER)
    n = len(bank)
    order, position = torch.randperm(n, generator=order_rng), 0
    tally = torch.zeros(num_classes, 5, dtype=TALLY_DTYPE, device=device)
    loss_sum, seen = 0.0, 0
    window = LossWindow(loss_check_interval(device))
    student.train()
    for step in range(opts.kd_steps):
        if n <= cfg.batch_size:
            positions = order
        else:
            if position + cfg.batch_size > n:       # a new pass; the short tail of the last one is dropped
                order, position = torch.randperm(n, generator=order_rng), 0
            positions = order[position:position + cfg.batch_size]
            position += cfg.batch_size
        x, _, ids = bank.get(positions, device)
        draw = (epoch - 1) * opts.kd_steps + step + 1
        if cfg.augment:
            x = augment_batch(x, ids, cfg.seed, draw)
        x = x.contiguous(memory_format=memory_format)
        with torch.inference_mode(), autocast():
            t_logits = teacher(x)
        t_logits = t_logits.float().clone()
        p_t = F.softmax(t_logits, dim=1)
        start = x + GAUSSIAN_START_STD * per_sample_normal(cfg.seed, ids, x.shape[1:],
                                                           stream=STREAM_STUDENT_START + draw, device=device,
                                                           dtype=x.dtype)
        x_adv = _uta_examples(student, x, start, p_t, opts.attack_gamma(), cfg, autocast)
        student.train()
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            logits_adv = student(x_adv.contiguous(memory_format=memory_format))
            logits_nat = student(x)
        kl_adv = distillation_divergence(logits_adv, t_logits, opts.student_loss)
        kl_nat = distillation_divergence(logits_nat, t_logits, opts.student_loss)
        loss = opts.loss_scale * (opts.alpha * kl_adv.mean() + (1.0 - opts.alpha) * kl_nat.mean())
        window.add(loss.detach(), len(positions), step)   # read every `loss_check_interval` steps
        step_sum, step_n = window.read_if_due(step, last=step == opts.kd_steps - 1)
        if step_n and not math.isfinite(step_sum / step_n):
            kept = (f"the last good checkpoint (epoch {history[-1]['epoch']}) is kept"
                    if history else "no checkpoint had been written yet")
            raise UserError(f"training stopped: the loss became {step_sum / step_n} at epoch {epoch}, "
                            f"{window.batches.replace('batch', 'step')}; {kept}; try a lower --lr or --precision fp32")
        loss.backward()
        optimizer.step()
        loss_sum += step_sum
        seen += step_n
        with torch.no_grad():
            teacher_pred = t_logits.argmax(1)
            columns = torch.stack([torch.ones_like(kl_adv), kl_adv.detach(), kl_nat.detach(),
                                   (logits_adv.detach().argmax(1) == teacher_pred).float(),
                                   (logits_nat.detach().argmax(1) == teacher_pred).float()], dim=1)
            tally += class_sums(teacher_pred, columns, num_classes, dtype=tally.dtype)
    return loss_sum / max(seen, 1), tally.cpu()


def _uta_examples(student: nn.Module, x: torch.Tensor, start: torch.Tensor, p_t: torch.Tensor, gamma: float,
                  cfg, autocast) -> torch.Tensor:
    """UTAE: cfg.steps sign steps from `start`, student in eval, ascending
    KL(p_t || s(x')) - gamma KL(uniform || s(x')) (query_sample.py generate_adv; gamma 0 = the code)."""
    with eval_mode(student):
        def objective(xa):
            with autocast():
                logits = student(xa)
            return uta_attack_loss(logits, p_t, gamma)

        return projected_ascent(objective, x, eps=cfg.eps, step_size=cfg.step_size, steps=cfg.steps, x_start=start)


def _fingerprint(cfg, opts: FerdOptions, warmup: int, num_classes: int, student_desc: str, image_shape,
                 teacher) -> dict:
    """What a resumed data-free run must share with its checkpoint."""
    return {
        "method": METHOD_NAME, "method_options": json.loads(json.dumps(opts.as_dict(), default=str)),
        "warmup": warmup, "epochs": cfg.epochs, "student": student_desc, "num_classes": num_classes,
        "lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay, "batch_size": cfg.batch_size,
        "eps": cfg.eps, "steps": cfg.steps, "step_size": cfg.step_size, "augment": cfg.augment, "seed": cfg.seed,
        "precision": cfg.precision, "image_shape": list(image_shape),
        "teacher_sha256": getattr(teacher, "sha256", None), "schedule": SCHEDULE,
    }


def class_specificity_note(history: Sequence[dict], num_classes: int,
                           threshold: float = LOW_TEACHER_AGREEMENT) -> Optional[str]:
    """A note when the teacher labels fewer than `threshold` of the synthetic images (mean over
    the epochs' best batches) as the class they were generated for; None otherwise."""
    shares = [h["method"].get("gen_teacher_agree") for h in history]
    shares = [s for s in shares if s is not None]
    if not shares:
        return None
    mean = sum(shares) / len(shares)
    if mean >= threshold:
        return None
    return (f"The teacher labels only {100 * mean:.0f}% of the synthetic images as the class they were "
            f"generated for (mean over {len(shares)} epochs; chance is {100 / num_classes:.0f}%): the "
            f"synthetic data is weakly class-specific, so the student mostly learns the teacher's outputs on "
            f"ambiguous images. More generator steps (ferd option g_steps) or a smaller bn_weight make the "
            f"images more class-specific: the BN-statistics term can dominate the generator loss for "
            f"low-confidence teachers such as small adversarially trained ones (docs/reproduction.md, FERD).")


def ferd_training_block(cfg, opts: FerdOptions, warmup: int, teacher, history: List[dict], selected_epoch,
                        bank: SyntheticBank, classes: Sequence[str], notes: Sequence[str], *,
                        use_bn: bool, use_fae: bool, nonrobust_active: Optional[str] = None,
                        ib_layer: Optional[str] = None) -> dict:
    """results.json "training" for a data-free run: run_remediate's block plus
    "class_probabilities" ([[p_c] per epoch], the distribution the epoch's labels were drawn
    from) and "synthetic_examples" ([{"class", "png"}]: the newest bank images per class)."""
    method_options = {**opts.as_dict(), "warmup": warmup, "bn_loss_active": use_bn, "fae_active": use_fae,
                      "nonrobust_active": nonrobust_active, "ib_layer_active": ib_layer,
                      "uta_gamma_active": opts.attack_gamma()}
    block = training_block(cfg, FERD(method_options), teacher, history, selected_epoch, False)
    options = block["options"]
    for key in ("val_per_class", "val_steps", "milestones", "sync_bn"):
        options.pop(key, None)
    options.update({"data_free": True, "schedule": f"{SCHEDULE}: {cfg.epochs} epochs, the first {warmup} "
                                                   f"generator-only", "notes": list(notes)})
    block["selection"] = ("last epoch (data-free: there are no real training images to hold out; the test set "
                          "is only audited)")
    block["synthetic_examples"] = synthetic_example_grid(bank, classes, opts.examples_per_class)
    return block
