"""What is being attributed: the training loss, the measurement, and the Fisher's pseudo-losses.

A :class:`Task` tells the analysis how to turn a model and a batch into per-example numbers. The
built-ins cover classification, regression, (causal) language modeling and sequence-to-sequence
(encoder-decoder) language modeling; any object with the same methods works.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import nn
from torch.nn import functional as F

from source_callback.analysis.finite import require_finite


@runtime_checkable
class Task(Protocol):
    """The protocol every task implements.

    All methods return one value per example of ``batch`` (shape ``[B]``), with gradients.

    A task may also have ``probe_loss(model, batch)``: the per-example loss the LightningModule's
    ``training_step`` computed, where it legitimately differs from ``loss`` (a regularisation
    term, label smoothing). :func:`~source_callback.analyze` compares the probe's recorded
    training losses with it (with ``loss`` where it is absent) and refuses a mismatch; see
    "The probe" in the recording guide.
    """

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Per-example training loss; its mean over a stage's dataset is that stage's objective."""
        ...

    def measurement(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Per-query quantity f whose counterfactual change the scores predict."""
        ...

    def pseudo_loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor:
        """Per-example loss with targets sampled from the model's predictive distribution.

        Its per-example gradient g satisfies ``E[g gᵀ] = Jᵀ H_out J`` (the Gauss-Newton Hessian
        of the per-example loss), which is what the curvature estimate averages.
        """
        ...


@runtime_checkable
class ExactFisherTask(Task, Protocol):
    """A task that can also give the Gauss-Newton Hessian exactly, for small outputs."""

    def exact_pseudo_losses(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """``[K, B]`` losses whose per-example gradients satisfy ``Σ_k g_k g_kᵀ = Jᵀ H_out J``."""
        ...


SUPERVISED_FORMS = (
    "a pair (inputs, targets), a mapping with 'input' and 'target', or a Hugging Face mapping "
    "with 'labels' (its other entries, e.g. 'input_ids' and 'attention_mask', are passed to the "
    "model as keyword arguments)"
)


def describe_batch(batch: Any) -> str:
    """What a batch is, for messages: ``a mapping with keys [...]``, ``a tuple of 2 items``."""
    if isinstance(batch, Mapping):
        return f"a mapping with keys {sorted(batch)}"
    if isinstance(batch, (list, tuple)):
        return f"a {type(batch).__name__} of {len(batch)} items"
    return f"a {type(batch).__name__}"


#: Probabilities a block of :func:`sample_labels` holds at once (float64: 128 MiB).
SAMPLING_BLOCK = 2**24


def sample_labels(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Labels drawn from ``softmax(logits)`` along the last axis, one per leading position.

    Each position's label is the inverse of its probabilities' cumulative sum (float64) at a
    uniform draw of ``generator``, a CPU generator: one draw per position, the same on every
    device, and the probabilities formed on the logits' device a block of positions at a time
    (``torch.multinomial`` needs them on the generator's device, all at once: the whole
    ``[B, T, V]`` of a language model's batch copied to the CPU).

    Parameters
    ----------
    logits
        ``[B, ..., C]`` scores of ``C`` classes (a language model's ``[B, T, V]``).
    generator
        The CPU generator of the pass, seeded per batch by the analysis.

    Returns
    -------
    torch.Tensor
        ``[B, ...]`` int64 labels on ``logits``' device.

    Raises
    ------
    NonFiniteError
        When an example's probabilities are not finite, naming it.
    """
    classes = logits.shape[-1]
    rows = logits.detach().reshape(-1, classes)
    uniform = torch.rand(len(rows), generator=generator, dtype=torch.float64).to(rows.device)
    labels = torch.empty(len(rows), dtype=torch.long, device=rows.device)
    step = max(1, SAMPLING_BLOCK // max(classes, 1))
    for start in range(0, len(rows), step):
        cdf = torch.softmax(rows[start : start + step].double(), dim=-1).cumsum_(-1)
        if not bool(torch.isfinite(cdf[:, -1]).all()):
            probs = torch.softmax(logits.detach().double(), dim=-1)
            require_finite(probs, "pseudo-label probabilities")  # names the example
        target = uniform[start : start + step, None] * cdf[:, -1:]
        drawn = torch.searchsorted(cdf, target, right=True)[:, 0]
        labels[start : start + step] = drawn.clamp_max_(classes - 1)
    return labels.reshape(logits.shape[:-1])


def _outputs(out: Any) -> torch.Tensor:
    """The model's output tensor: itself, or a Hugging Face output's ``logits``."""
    return getattr(out, "logits", out)


def _forward(model: nn.Module, batch: Any, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's outputs on a supervised batch, and the batch's targets."""
    if isinstance(batch, Mapping) and "labels" in batch:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return _outputs(model(**inputs)), batch["labels"]
    if isinstance(batch, Mapping) and {"input", "target"} <= batch.keys():
        return _outputs(model(batch["input"])), batch["target"]
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return _outputs(model(batch[0])), batch[1]
    raise TypeError(
        f"{task} got {describe_batch(batch)} as a batch; it expects {SUPERVISED_FORMS}. Make the "
        "dataset (or collate_fn) return one of those, or pass a Task of your own."
    )


class ClassificationTask:
    """Cross-entropy classification; the model returns logits (or an output with ``.logits``).

    A batch is ``(inputs, labels)``, ``{"input": ..., "target": ...}``, or a Hugging Face
    mapping with ``labels`` whose other entries (``input_ids``, ``attention_mask``, ...) are
    the model's keyword arguments.

    Parameters
    ----------
    measurement
        ``"loss"`` (the query's cross-entropy; positive scores mean helpful) or ``"margin"``
        (the correct logit minus the log-sum-exp of the others).

    """

    def __init__(self, measurement: Literal["loss", "margin"] = "loss") -> None:
        if measurement not in ("loss", "margin"):
            raise ValueError(f"measurement must be 'loss' or 'margin', got {measurement!r}")
        self.kind = measurement

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Per-example cross-entropy."""
        logits, labels = _forward(model, batch, type(self).__name__)
        return F.cross_entropy(logits, labels, reduction="none")

    def measurement(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Per-query loss or margin."""
        logits, labels = _forward(model, batch, type(self).__name__)
        if self.kind == "loss":
            return F.cross_entropy(logits, labels, reduction="none")
        correct = logits.gather(1, labels[:, None])[:, 0]
        others = logits.scatter(1, labels[:, None], float("-inf"))
        return correct - torch.logsumexp(others, dim=1)

    def pseudo_loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor:
        """Cross-entropy against labels sampled from the softmax."""
        logits, _ = _forward(model, batch, type(self).__name__)
        return F.cross_entropy(logits, sample_labels(logits, generator), reduction="none")

    def exact_pseudo_losses(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """One loss per class: ``⟨r_k, logits⟩`` with ``Σ_k r_k r_kᵀ = diag(p) − ppᵀ``."""
        # diag(p) − ppᵀ = Σ_k r_k r_kᵀ with r_k = √p_k (e_k − p); ⟨r_k, logits⟩ has gradient Jᵀr_k.
        logits, _ = _forward(model, batch, type(self).__name__)
        p = torch.softmax(logits.detach(), dim=1)
        eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
        r = p.sqrt().T[:, :, None] * (eye[:, None, :] - p[None, :, :])  # [K, B, C]
        return (r * logits[None]).sum(-1)


class RegressionTask:
    """Mean-squared-error regression; batches as for :class:`ClassificationTask`.

    The per-example loss is the squared error averaged over output dimensions (so its dataset
    mean is ``F.mse_loss``); the measurement is the same per-query loss.
    """

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Per-example squared error, averaged over output dimensions."""
        out, targets = _forward(model, batch, type(self).__name__)
        return ((out - targets.reshape(out.shape)) ** 2).reshape(len(out), -1).mean(1)

    def measurement(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Per-query squared error."""
        return self.loss(model, batch)

    def pseudo_loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor:
        """Squared error against targets sampled around the prediction."""
        # L = mean_d (f_d − y_d)²: H_out = (2/D) I, matched by y ~ N(f, D/2 · I).
        out, _ = _forward(model, batch, type(self).__name__)
        flat = out.reshape(len(out), -1)
        dims = flat.shape[1]
        noise = torch.randn(flat.shape, generator=generator, dtype=torch.float64)
        target = flat.detach() + (dims / 2) ** 0.5 * noise.to(flat.device, flat.dtype)
        return ((flat - target) ** 2).mean(1)

    def exact_pseudo_losses(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """One loss per output dimension: ``√(2/D) f_d``."""
        # H_out = (2/D) I = Σ_k r_k r_kᵀ with r_k = √(2/D) e_k.
        out, _ = _forward(model, batch, type(self).__name__)
        flat = out.reshape(len(out), -1)
        dims = flat.shape[1]
        return (2 / dims) ** 0.5 * flat.T


class LanguageModelingTask:
    """Next-token cross-entropy on token sequences.

    ``batch`` is a mapping with ``input_ids`` ``[B, T]`` and optionally ``labels`` (defaults to
    ``input_ids``; ``-100`` marks positions that carry no loss) and ``attention_mask`` (passed
    to the model when given; positions where it is 0 carry no loss either). The model returns
    logits ``[B, T, V]`` (or an object with ``.logits``); position t predicts label t+1.

    Parameters
    ----------
    tokens_per_example
        The per-example loss is the sum of its token losses divided by this number, so that
        its dataset mean equals a token-mean training objective (the Hugging Face
        ``Trainer``'s: the mean over all labelled tokens of a step) when this is the mean
        number of labelled tokens per example of the stage. ``None`` divides by the example's
        own token count (the same objective when all examples have as many labelled tokens).
        Either way :meth:`probe_loss` is the example's own token mean.
    """

    def __init__(self, tokens_per_example: float | None = None) -> None:
        if tokens_per_example is not None and not (
            isinstance(tokens_per_example, int | float)
            and math.isfinite(tokens_per_example)
            and tokens_per_example > 0
        ):
            raise ValueError(
                "tokens_per_example must be a positive number, the stage's mean number of "
                f"labelled tokens per example (or None), got {tokens_per_example!r}"
            )
        self.tokens_per_example = tokens_per_example

    @staticmethod
    def _logits_and_labels(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise TypeError(
                f"LanguageModelingTask got {describe_batch(batch)} as a batch; it expects a "
                "mapping with 'input_ids' [batch, tokens] and optionally 'attention_mask' and "
                "'labels' (-100 where no loss), as Hugging Face tokenizers and collators make. "
                "Make the dataset return such dicts, or pass a Task of your own."
            )
        inputs = batch["input_ids"]
        mask = batch.get("attention_mask")
        out = model(inputs) if mask is None else model(inputs, attention_mask=mask)
        logits = _outputs(out)
        labels = batch.get("labels", inputs).clone()
        if mask is not None:
            labels[mask == 0] = -100
        return logits[:, :-1], labels[:, 1:]

    def _normalise(self, token_losses: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.tokens_per_example is not None:
            return token_losses.sum(1) / self.tokens_per_example
        return self._own_mean(token_losses, labels)

    @staticmethod
    def _own_mean(token_losses: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return token_losses.sum(1) / (labels != -100).sum(1).clamp_min(1)

    @staticmethod
    def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        flat = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none"
        )
        return flat.reshape(labels.shape)  # 0 where the label is -100

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Per-example next-token cross-entropy, normalised as configured."""
        logits, labels = self._logits_and_labels(model, batch)
        return self._normalise(self._token_losses(logits, labels), labels)

    def probe_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Per-example mean of the example's own token losses: its training loss alone.

        A token-mean objective (the models' own ``loss``, the ``Trainer``'s) computes this for
        a batch of one example, and the probe recorded it so. With ``tokens_per_example`` it
        differs from :meth:`loss`, which weights the examples as the whole stage's token mean
        does. (A ``training_step`` that itself averages this task's :meth:`loss` with
        ``tokens_per_example`` recorded that loss instead: give such a task a ``probe_loss``
        returning :meth:`loss`.)
        """
        logits, labels = self._logits_and_labels(model, batch)
        return self._own_mean(self._token_losses(logits, labels), labels)

    def measurement(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Per-query negative log-likelihood of its labelled tokens (summed)."""
        logits, labels = self._logits_and_labels(model, batch)
        return self._token_losses(logits, labels).sum(1)

    def pseudo_loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor:
        """The loss against next tokens sampled from the model, at the labelled positions."""
        logits, labels = self._logits_and_labels(model, batch)
        sampled = sample_labels(logits, generator).to(labels.device)
        sampled[labels == -100] = -100
        return self._normalise(self._token_losses(logits, sampled), labels)


class Seq2SeqTask(LanguageModelingTask):
    """Cross-entropy of an encoder-decoder's target tokens given its input (T5, BART, Marian).

    ``batch`` is a mapping with ``input_ids`` ``[B, S]``, ``labels`` ``[B, T]`` (``-100`` marks
    positions that carry no loss, as ``DataCollatorForSeq2Seq`` pads them) and optionally
    ``attention_mask``, ``decoder_input_ids`` and ``decoder_attention_mask``, all passed to the
    model. Without ``decoder_input_ids`` they are the labels shifted right: by the model's
    ``prepare_decoder_input_ids_from_labels`` where it has one (Hugging Face's seq2seq models),
    otherwise the model is called with ``labels=`` and shifts them itself, as Hugging Face's
    models do. The model returns logits ``[B, T, V]`` (or an object with ``.logits``); position
    t predicts label t. Losses, measurement, pseudo-labels and ``tokens_per_example`` are as in
    :class:`LanguageModelingTask`.
    """

    @staticmethod
    def _logits_and_labels(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(batch, Mapping) or not {"input_ids", "labels"} <= batch.keys():
            raise TypeError(
                f"Seq2SeqTask got {describe_batch(batch)} as a batch; it expects a mapping with "
                "'input_ids' [batch, source tokens] and 'labels' [batch, target tokens] (-100 "
                "where no loss), optionally 'attention_mask', 'decoder_input_ids' and "
                "'decoder_attention_mask', as Hugging Face's DataCollatorForSeq2Seq makes. Make "
                "the dataset return such dicts, or pass a Task of your own."
            )
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
        if "decoder_input_ids" not in inputs and callable(prepare):
            inputs["decoder_input_ids"] = prepare(labels=labels)
        elif "decoder_input_ids" not in inputs:
            inputs["labels"] = labels
        return _outputs(model(**inputs)), labels


def resolve_task(task: str | Task) -> Task:
    """A built-in task by name, or ``task`` itself.

    Names: ``classification``, ``regression``, ``language_modeling``, ``seq2seq``.
    """
    builtins = {
        "classification": ClassificationTask,
        "regression": RegressionTask,
        "language_modeling": LanguageModelingTask,
        "seq2seq": Seq2SeqTask,
    }
    if isinstance(task, str):
        if task not in builtins:
            raise ValueError(f"unknown task {task!r}; use one of {sorted(builtins)} or a Task")
        return builtins[task]()
    if not isinstance(task, Task):
        raise TypeError(
            f"task must be a name or an object with loss/measurement/pseudo_loss, got {task!r}"
        )
    return task
