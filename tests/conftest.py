import os
import shutil
import signal
import warnings

# Triton decides at import/decoration time whether it interprets kernels: on a machine without a
# GPU set TRITON_INTERPRET before anything (torch.compile included) can import triton.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))
warnings.filterwarnings("ignore", message=".*bos_token_id.*")

# A suite started in the background by a non-interactive shell (`cmd &`, nohup, CI wrappers) has
# SIGINT ignored, and the CLIs rightly leave an ignored Ctrl-C ignored (children inherit it too):
# the tests that deliver Ctrl-C need it deliverable, so give the process Python's own handler.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()
