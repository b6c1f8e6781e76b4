"""Errors a user sees as one line: what was wrong, with which file or value, and what to do."""


class LayerstreamError(Exception):
    """Base of every error that the launcher reports as one line and a non-zero exit."""


class ModelError(LayerstreamError):
    """The model file is unreadable, truncated, of an unknown architecture or incomplete."""


class UnsupportedQuantError(ModelError):
    """A tensor is stored in a quantization type this engine cannot dequantize."""


class ConfigError(LayerstreamError):
    """A command-line option or budget cannot work (e.g. a VRAM budget too small to run)."""


class PipelineError(LayerstreamError):
    """A pipeline process died or failed; the message says which and why."""


def shown(value, most: int = 60) -> str:
    """repr(value) for a one-line message (quoted, a newline as \\n), cut after `most` characters:
    a value thousands of characters long was echoed whole."""
    text = repr(value)
    return text if len(text) <= most else f"{text[:most]}... ({len(text) - most} more characters)"


# the end of the line that names a stalled process (the pipeline's watchdog, a send to a full queue)
STALLED = "(stalled: stopped, hung or swapping); raise --stall-timeout if that is expected"


class ContextFullError(LayerstreamError):
    """A sequence outgrew its KV ring and the run was asked to fail rather than slide."""


class PromptTooLongError(ContextFullError):
    """A prompt leaves no room in the context to generate (refused before it runs)."""

    def __init__(self, tokens: int, ctx: int):
        super().__init__(f"the prompt is {tokens} tokens, the context size ({ctx} tokens) leaves no room to "
                         "generate; raise --ctx, shorten the prompt, or use --on-context-full slide")
        self.tokens, self.ctx = tokens, ctx

    def __reduce__(self):  # (its text as it is: python_names may have rewritten it)
        return _prompt_too_long, (type(self), self.tokens, self.ctx, self.args)


def _prompt_too_long(cls: type, tokens: int, ctx: int, args: tuple) -> PromptTooLongError:
    e = cls(tokens, ctx)
    e.args = args
    return e
