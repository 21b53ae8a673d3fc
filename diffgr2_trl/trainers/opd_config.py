"""Configuration of :class:`~diffgr2_trl.trainers.OnPolicyDistillationTrainer` (TRL keeps each trainer's config in
its own module too)."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field

from trl import DistillationConfig

from ..block_diffusion import BlockDecodingConfig
from ..errors import OptionError
from ._decoding_fields import refuse_unused_generation_settings, trl_field

__all__ = ["REPLAY_MODES", "OnPolicyDistillationConfig"]

REPLAY_MODES = ("all", "one_state_per_block")


@dataclass
class OnPolicyDistillationConfig(BlockDecodingConfig, DistillationConfig):
    r"""Configuration for :class:`OnPolicyDistillationTrainer`: all of :class:`trl.DistillationConfig` and of
    :class:`~diffgr2_trl.block_diffusion.BlockDecodingConfig`, plus the fields below.

    ``per_device_train_batch_size`` counts *prompts*; each micro-step trains on ``per_device_train_batch_size *
    num_generations`` trajectories. ``beta`` keeps TRL's meaning (0 = forward KL(teacher || student), 1 = reverse KL,
    between = generalised JSD) with the paper's forward KL as default. TRL's ``temperature`` / ``top_k`` /
    ``max_completion_length`` are the rollouts' (the loss has its own ``loss_temperature``). ``top_p`` / ``min_p`` /
    ``repetition_penalty`` / ``use_vllm`` are not supported by the block sampler and must stay at their defaults;
    TRL's ``teacher_model_*`` fields are not used (see ``teacher_model`` below).

    Parameters that control the teacher:

        teacher_model (`str` or `None`, *optional*, defaults to `None`):
            The AR teacher: a checkpoint path / hub id (in-process HF), ``"http://host:port"`` (a vLLM server, e.g.
            ``diffgr2 serve-teacher``) or ``"vllm:PATH"`` (in-process vLLM). Ignored when a
            :class:`~diffgr2_trl.teachers.Teacher` is passed to the trainer.
        teacher_tokenizer (`str` or `None`, *optional*, defaults to `None`):
            Tokenizer path for the student/teacher vocabulary check. ``None``: the teacher's own directory (for a
            server, the directory it serves, when it is on this machine).
        teacher_kwargs (`dict`, `str` or `None`, *optional*, defaults to `None`):
            Keyword arguments for the teacher backend (a dict, or a JSON string on the command line).
        teacher_top_k (`int`, *optional*, defaults to `20`):
            Teacher log-probs per position for the top-k + tail divergence.
        full_vocab (`bool` or `None`, *optional*, defaults to `None`):
            Full-vocabulary divergence (in-process HF teacher only). ``None``: full when the teacher supports it.

    Parameters that control the rollouts:

        num_generations (`int`, *optional*, defaults to `4`):
            Trajectories per prompt (4 in the paper).
        max_completion_length (`int`, *optional*, defaults to `128`):
            Maximum number of tokens generated per rollout.
        max_new_tokens (`int` or `None`, *optional*, defaults to `None`):
            Deprecated spelling of ``max_completion_length`` (TRL's name), still accepted for one release.
        max_prompt_length (`int` or `None`, *optional*, defaults to `None`):
            Keep only the last this many prompt tokens. ``None``: no truncation.
        temperature (`float`, *optional*, defaults to `1.0`):
            Rollout sampling temperature; ``0`` decodes greedily.
        top_k (`int`, *optional*, defaults to `0`):
            Sample among the ``top_k`` most likely tokens only. ``0`` disables the filter.
        tau (`float`, *optional*, defaults to `0.9`):
            The sampler's confidence threshold in (0, 1]: each denoising step commits every masked position of the
            block whose confidence is at least ``tau``, plus the most confident one. Ignored when ``tokens_per_step``
            is set.
        tokens_per_step (`int` or `None`, *optional*, defaults to `None`):
            Fixed schedule instead of ``tau``: commit the ``tokens_per_step`` most confident positions per step.
        block_size (`int` or `None`, *optional*, defaults to `None`):
            Must stay `None`: rollouts are decoded with the model's block size, the one the replay uses.
        stop_token_ids (`list[int]` or `None`, *optional*, defaults to `None`):
            Token ids that end a rollout, in addition to the EOS token.

    Parameters that control the loss:

        replay (`str`, *optional*, defaults to `"all"`):
            ``"all"`` distills every committed token at its commit state; ``"one_state_per_block"`` draws one
            denoising step per block and distills only the tokens committed at that step (one packed stream instead
            of one per step; those tokens are weighted by the block's number of steps, so the loss stays an unbiased
            estimate of the ``"all"`` loss).
        max_streams_per_forward (`int` or `None`, *optional*, defaults to `None`):
            Bound the step states packed in one replay forward (memory); ``"all"`` only.
        beta (`float`, *optional*, defaults to `0.0`):
            0 = forward KL(teacher || student) (the paper's), 1 = reverse KL, between = generalised JSD.
        loss_temperature (`float`, *optional*, defaults to `1.0`):
            Softmax temperature of both distributions in the loss.
        loss_chunk_size (`int`, *optional*, defaults to `256`):
            Token positions (rows x columns) whose output layer and divergence are computed at once. The chunks run
            under activation checkpointing (rebuilt in backward), so the loss holds O(``loss_chunk_size`` x V)
            floats instead of O(rows x T x V); the full-vocabulary teacher is read a chunk at a time too. Larger is
            faster on a GPU; at V = 152k each position costs ~0.6 MB per float32 copy.

    > Parameters whose defaults differ from :class:`trl.DistillationConfig`:

    - ``max_completion_length``: `128` instead of `512`.
    - ``beta``: `0.0` (forward KL, the paper's) instead of `1.0`.
    - ``learning_rate``: `5e-5` (``transformers.TrainingArguments``'s) instead of `1e-6`.
    - ``gradient_checkpointing``: `False` instead of `True`.
    """

    _VALID_DICT_FIELDS = DistillationConfig._VALID_DICT_FIELDS + ["teacher_kwargs"]

    learning_rate: float = trl_field(DistillationConfig, "learning_rate", default=5e-5)
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Gradient checkpointing of the student."})
    # Prompt-only rows: keep every column (valid_fn may read them); the identity collator ignores the rest.
    remove_unused_columns: bool | None = field(
        default=False, metadata={"help": "Keep dataset columns (valid_fn reads them)."}
    )

    teacher_model: str | None = field(default=None, metadata={"help": "Teacher: a path, http://host:port or vllm:PATH."})
    teacher_tokenizer: str | None = field(default=None, metadata={"help": "Teacher tokenizer path (vocabulary check)."})
    teacher_kwargs: dict | str | None = field(default=None, metadata={"help": "Teacher backend kwargs (JSON)."})
    teacher_top_k: int = field(default=20, metadata={"help": "Teacher top-k log-probs per position (top-k KL)."})
    full_vocab: bool | None = field(default=None, metadata={"help": "Full-vocabulary KL (HF teacher). Default: auto."})

    num_generations: int = field(default=4, metadata={"help": "Student trajectories per prompt."})
    # Declared by both bases: TRL's declaration wins (see diffgr2_trl.trainers._decoding_fields), except the default
    # length, kept at this trainer's 128.
    max_completion_length: int | None = trl_field(DistillationConfig, "max_completion_length", default=128,
                                                  help="Maximum number of tokens generated per rollout.")
    # Rollouts sample at TRL's default temperature 1.0, not the sampler's greedy default: on-policy distillation
    # trains on the student's own distribution, which greedy decoding would collapse to its mode (every rollout of a
    # prompt identical, num_generations wasted), and the paper distills from sampled rollouts.
    temperature: float = trl_field(DistillationConfig, "temperature",
                                   help="Rollout sampling temperature (0 = greedy).")
    top_k: int = trl_field(DistillationConfig, "top_k")
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "Deprecated: use max_completion_length (TRL's name)."}
    )
    max_prompt_length: int | None = field(default=None, metadata={"help": "Left-truncate prompts to this length."})

    replay: str = field(default="all", metadata={"help": "'all' or 'one_state_per_block'."})
    max_streams_per_forward: int | None = field(default=None, metadata={"help": "Step states per replay forward."})
    beta: float = trl_field(DistillationConfig, "beta", default=0.0,
                            help="0 forward KL (default), 1 reverse KL, between: generalised JSD.")
    loss_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature in the loss."})
    loss_chunk_size: int = field(default=256, metadata={"help": "Token positions per chunk of the loss (memory)."})

    def __post_init__(self):
        if self.max_new_tokens is not None:
            warnings.warn("OnPolicyDistillationConfig.max_new_tokens is deprecated and will be removed in the next "
                          "release; use max_completion_length (TRL's name).", FutureWarning, stacklevel=3)
            self.max_completion_length = self.max_new_tokens
            self.max_new_tokens = None
        DistillationConfig.__post_init__(self)  # BlockDecodingConfig comes first in the MRO and does not chain
        self.check_decoding()
        if self.block_size is not None:
            raise ValueError(f"block_size={self.block_size}: rollouts must be decoded with the model's own block size, "
                             "the one the replay uses; leave block_size unset for training.")
        if isinstance(self.teacher_kwargs, str):
            self.teacher_kwargs = json.loads(self.teacher_kwargs)
        if self.num_generations <= 0:
            raise OptionError("num_generations", f"must be a positive integer, got {self.num_generations}.")
        if self.replay not in REPLAY_MODES:
            raise OptionError("replay", f"must be one of {REPLAY_MODES}, got {self.replay!r}.")
        if self.loss_temperature <= 0:
            raise OptionError("loss_temperature", f"must be > 0, got {self.loss_temperature}.")
        if self.loss_chunk_size < 1:
            raise OptionError("loss_chunk_size", f"must be a positive integer, got {self.loss_chunk_size}.")
        if self.teacher_top_k <= 0:
            raise OptionError("teacher_top_k", f"must be positive, got {self.teacher_top_k}.")
        if self.max_prompt_length is not None and self.max_prompt_length <= 0:
            raise OptionError("max_prompt_length", f"must be positive, got {self.max_prompt_length}.")
        if self.top_p != 1.0 or self.min_p is not None or self.repetition_penalty != 1.0:
            raise ValueError("The block-diffusion sampler supports temperature and top_k only: leave top_p=1.0, "
                             "min_p=None and repetition_penalty=1.0.")
        if self.teacher_model_name_or_path is not None or self.teacher_model_init_kwargs is not None:
            raise ValueError("Set the teacher with teacher_model (a path, http://host:port or vllm:PATH) and "
                             "teacher_kwargs; teacher_model_name_or_path / teacher_model_init_kwargs are not used.")
        if self.use_vllm:
            raise ValueError("Rollouts come from the block-diffusion sampler: use_vllm is not supported (a vLLM "
                             "teacher is set with teacher_model='http://host:port' or 'vllm:PATH').")
        refuse_unused_generation_settings(self)
        if self.pad_to_multiple_of is not None:  # TRL resolved "auto" to None here (128 on Neuron devices only)
            raise OptionError("pad_to_multiple_of", "is not used: the rollouts and the replay lay out their own "
                              f"sequences; leave it at 'auto' or None, got {self.pad_to_multiple_of!r}.")
