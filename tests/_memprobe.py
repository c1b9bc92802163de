"""Helper run in a subprocess by test_memory.py: peak RSS growth of one AdamW training step."""
import json
import sys

import torch

from gptforge.model import GPT, GPTConfig


def peak_rss() -> int:
    """VmHWM of this process's own address space (ru_maxrss would inherit the forking parent's peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


torch.set_num_threads(1)
cfg = GPTConfig(**json.loads(sys.argv[1]))
B, T = int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
x = torch.randint(0, cfg.vocab_size, (B, T))
tiny = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=1, n_embd=8))  # warm up kernels and allocator
opt = torch.optim.AdamW(tiny.parameters(), foreach=False)
tiny(x[:1, :8] % 64, x[:1, :8] % 64)[1].backward(); opt.step()
base = peak_rss()
model = GPT(cfg)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
for _ in range(2):
    _, loss = model(x, x)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
peak = peak_rss()
print(peak - base)
