"""An lm-evaluation-harness ``LM`` backed by the streamed model.

Tokenization follows lm-eval's own ``hf`` model (``lm_eval.models.huggingface.HFLM``, checked against
0.4.13) so that results match it:

- ``loglikelihood`` is ``TemplateLM.loglikelihood`` itself: trailing spaces of the context move to the
  continuation, context + continuation are encoded together and split at the context's own encoding
  length; an empty context becomes ``[prefix_token_id]`` (BOS, else EOS);
- ``tok_encode`` is HFLM's: the tokenizer's default special tokens (or ``add_bos_token``), none when the
  text already starts with the BOS string;
- a request longer than ``max_length + 1`` tokens loses tokens from the left; the model reads all but the
  last token and the last ``len(continuation)`` positions are scored; ``is_greedy`` when each continuation
  token is the argmax;
- ``max_length``: the config's ``n_positions`` / ``max_position_embeddings`` / ``n_ctx``, else the
  tokenizer's ``model_max_length``, else 2048;
- ``loglikelihood_rolling``: lm-eval's rolling windows (``get_rolling_token_windows`` with context 1,
  made disjoint), every window of every request scored in the same streamed passes, summed per request.

``generate_until`` is refused: generation would need one full streamed sweep per generated token.
"""

from __future__ import annotations

import logging

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from lowmem_gblm.engine.loglik import DEFAULT_PASS_TOKENS, streamed_loglikelihoods
from lowmem_gblm.errors import InputError, UsageError
from lowmem_gblm.io.model import StreamedModel

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048  # lm-eval's default when neither config nor tokenizer gives a context length
TOKENIZER_INFINITY = 1000000000000000019884624838656  # transformers' "no model_max_length"
SEQLEN_CONFIG_ATTRS = ("n_positions", "max_position_embeddings", "n_ctx")

GENERATE_REFUSED = ("generate_until is not supported by the streamed model: it scores log-likelihoods only "
                    "(multiple-choice and perplexity tasks such as boolq, rte, hellaswag, winogrande, arc_easy, "
                    "arc_challenge, openbookqa); generation would need one streamed sweep per token")


def resolve_max_length(config, tokenizer) -> int:
    """The context length lm-eval's HFLM uses for this model (see the module docstring)."""
    cfg = getattr(config, "text_config", None) or config
    for attr in SEQLEN_CONFIG_ATTRS:
        value = getattr(cfg, attr, None)
        if value is not None:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit != TOKENIZER_INFINITY:
        return int(limit)
    return DEFAULT_MAX_LENGTH


def truncate_left(context: list[int], continuation: list[int], max_length: int) -> list[int]:
    """context + continuation, cut from the left so that the model reads at most ``max_length`` positions."""
    return (context + continuation)[-(max_length + 1):]


class StreamedLM(TemplateLM):
    """lm-eval LM over a StreamedModel: log-likelihoods block by block (engine.loglik)."""

    def __init__(self, model: StreamedModel, tokenizer, device: torch.device, dtype: torch.dtype,
                 batch_size: int = 1, pass_tokens: int = DEFAULT_PASS_TOKENS, prefetch: bool = True,
                 head_chunk: int | None = None, progress: bool = False, max_length: int | None = None,
                 add_bos_token: bool | None = None, prefix_token_id: int | None = None):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self._device, self.dtype = torch.device(device), dtype
        self.batch_size, self.pass_tokens, self.prefetch = batch_size, pass_tokens, prefetch
        self.head_chunk, self.progress = head_chunk, progress
        self.max_length = max_length or resolve_max_length(model.config, tokenizer)
        self.add_bos_token, self.custom_prefix_token_id = add_bos_token, prefix_token_id

    # -- tokenization (HFLM's rules) ---------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        if not isinstance(string, str):  # a task's doc_to_text / doc_to_target gave a number or a list
            raise InputError(f"--tasks: a task gave {string!r} ({type(string).__name__}) where lm-eval needs text: "
                             "its doc_to_text / doc_to_target must name a text field for this kind of task")
        special = add_special_tokens if add_special_tokens is not None else self.add_bos_token
        kw = {} if special is None else {"add_special_tokens": special}
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            kw["add_special_tokens"] = False  # the text already starts with BOS
        encoding = self.tokenizer.encode(string, **kw)
        return encoding[-left_truncate_len:] if left_truncate_len else encoding

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # -- scoring -----------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or None, context ids, continuation ids) -> (log p, is_greedy)."""
        tokens, conts, cut = [], [], 0
        for _, context_enc, continuation_enc in requests:
            if not context_enc or not continuation_enc or len(continuation_enc) > self.max_length:
                raise UsageError(f"a loglikelihood request with {len(context_enc)} context and "
                                 f"{len(continuation_enc)} continuation tokens cannot be scored "
                                 f"(max length {self.max_length})")
            cut += len(context_enc) + len(continuation_enc) > self.max_length + 1
            tokens.append(truncate_left(context_enc, continuation_enc, self.max_length))
            conts.append(len(continuation_enc))
        if cut:
            log.warning("%d of %d requests exceed the model's %d positions: their contexts are cut from the left",
                        cut, len(requests), self.max_length)
        results = streamed_loglikelihoods(self.model, tokens, conts, self._device, self.dtype, self.batch_size,
                                          self.pass_tokens, self.prefetch, self.head_chunk,
                                          self.progress and not disable_tqdm)
        for (key, _, _), answer in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Σ log p of each whole string, in lm-eval's disjoint rolling windows of ``max_length``."""
        windows, owner = [], []
        for k, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(k)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
        totals = [0.0] * len(requests)
        for k, (logp, _) in zip(owner, scores, strict=True):
            totals[k] += logp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        tasks = sorted({str(getattr(r, "task_name", None) or "?") for r in requests})
        raise UsageError(f"{GENERATE_REFUSED} (asked by task(s): {', '.join(tasks)})")
