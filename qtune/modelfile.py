"""An Ollama Modelfile next to an exported .gguf: FROM, TEMPLATE (Go template) and PARAMETER stop.

The TEMPLATE is written for chat templates whose format is recognised (ChatML, Llama-3 headers).
For any other template none is written: Ollama then derives the template from the GGUF's own
``tokenizer.chat_template``, which is always exported. Stop tokens are the tokenizer's EOS plus the
format's end-of-turn markers.
"""

from __future__ import annotations

from pathlib import Path

from qtune.paths import write_text_atomic

CHATML_TEMPLATE = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
LLAMA3_TEMPLATE = (
    "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)


def chat_format(chat_template: str | None) -> str | None:
    """'chatml', 'llama3' or None (unrecognised or no template)."""
    if not chat_template:
        return None
    if "<|im_start|>" in chat_template and "<|im_end|>" in chat_template:
        return "chatml"
    if "<|start_header_id|>" in chat_template and "<|eot_id|>" in chat_template:
        return "llama3"
    return None


def modelfile_text(gguf_name: str, chat_template: str | None, eos_token: str | None) -> str:
    """The Modelfile for ``gguf_name`` (a path relative to the Modelfile, usually the file name)."""
    fmt = chat_format(chat_template)
    stops: list[str] = []
    if fmt == "chatml":
        stops += ["<|im_end|>", "<|im_start|>"]
    elif fmt == "llama3":
        stops += ["<|eot_id|>", "<|start_header_id|>"]
    if eos_token and eos_token not in stops:
        stops.insert(0, eos_token)

    lines = [f"FROM ./{gguf_name}", ""]
    template = {"chatml": CHATML_TEMPLATE, "llama3": LLAMA3_TEMPLATE}.get(fmt or "")
    if template is not None:
        if '"""' in template:
            raise ValueError("a Modelfile TEMPLATE cannot contain triple quotes")
        lines += [f'TEMPLATE """{template}"""', ""]
    elif chat_template:
        lines += ["# TEMPLATE omitted: Ollama reads the chat template stored in the GGUF (tokenizer.chat_template)", ""]
    for stop in stops:
        lines.append(f"PARAMETER stop {_quote(stop)}")
    return "\n".join(lines).rstrip("\n") + "\n"


def write_modelfile(gguf_path: Path, tokenizer_dir: Path, output: Path | None = None) -> Path:
    """Write ``Modelfile`` (or ``output``) beside ``gguf_path`` using the HF tokenizer in ``tokenizer_dir``."""
    from transformers import AutoTokenizer

    gguf_path = Path(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    output = Path(output) if output is not None else gguf_path.with_name("Modelfile")
    write_text_atomic(output, modelfile_text(gguf_path.name, template, tokenizer.eos_token))
    return output


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
