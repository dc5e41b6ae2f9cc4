# %% [markdown]
# # lorafuse quickstart: LoRA on a small Llama, as a drop-in for PEFT
#
# This notebook builds a small Llama-architecture model from a config (random weights, so it
# runs anywhere with no download), puts LoRA adapters into its attention projections with
# lorafuse, trains a few steps, saves the adapter in PEFT's format, reloads it with **PEFT
# itself**, and merges the adapter into the weights. The only lorafuse-specific line is the import:
# the model lorafuse returns *is* a PEFT model (`peft.PeftModel`), whose LoRA layers run fused kernels.

# %%
import copy
import warnings

import peft
import torch
import transformers

import lorafuse
from lorafuse import LoraConfig, get_peft_model  # instead of: from peft import LoraConfig, get_peft_model

lorafuse.show_config()
torch.manual_seed(0)
transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notices

# %% [markdown]
# ## 1. A small model and LoRA on its attention projections

# %%
config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
base = transformers.LlamaForCausalLM(config)
base_weights = copy.deepcopy(base.state_dict())  # to rebuild the same base model later

lora_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                         task_type="CAUSAL_LM")
model = get_peft_model(base, lora_config)
model.print_trainable_parameters()
print(type(model).__name__, "is a peft.PeftModel:", isinstance(model, peft.PeftModel))
print(model.base_model.model.model.layers[0].self_attn.q_proj)  # PEFT's lora.Linear, as lorafuse.FusedLinear

# %% [markdown]
# ## 2. Train a few steps
# The task: continue a repeating pattern of tokens. Only `lora_A` / `lora_B` are trainable;
# lorafuse computes each LoRA layer's forward and its adapter-only backward in fused C kernels.
# Each layer's `lorafuse_path` tells which path its last forward took: `'c'` (the fused CPU
# kernels), `'cuda'`, or `'peft'` (PEFT's own forward, for what the kernels do not cover).

# %%
pattern = torch.arange(8).repeat(8)[None, :48] * 7 % 256         # 1 × 48 token ids
batch = pattern.repeat(4, 1)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
model.train()
losses = []
for step in range(30):
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    losses.append(loss.item())
print(f"loss: step 1 {losses[0]:.3f} -> step {len(losses)} {losses[-1]:.3f}")
assert losses[-1] < losses[0]
paths = {layer.lorafuse_path for layer in model.modules() if isinstance(layer, lorafuse.FusedLinear)}
print("path of every LoRA layer's last forward:", paths)
assert paths == {"c"}

# %% [markdown]
# ## 3. Save in PEFT's format, reload with PEFT

# %%
import os
import tempfile

model.eval()
with torch.no_grad():
    ours = model(input_ids=batch).logits

adapter_dir = tempfile.mkdtemp(prefix="lorafuse-quickstart-")
model.save_pretrained(adapter_dir)
print(sorted(os.listdir(adapter_dir)))

fresh = transformers.LlamaForCausalLM(config)
fresh.load_state_dict(base_weights)
reloaded = peft.PeftModel.from_pretrained(fresh, adapter_dir)  # PEFT, not lorafuse
reloaded.eval()
with torch.no_grad():
    theirs = reloaded(input_ids=batch).logits
torch.testing.assert_close(ours, theirs)
print("PEFT reloads the lorafuse adapter: same logits, max |diff| =", (ours - theirs).abs().max().item())

# %% [markdown]
# ## 4. Merge the adapter into the weights
# PEFT's `merge_and_unload()` computes `W += s·B·A` in place and returns the plain model.

# %%
merged = model.merge_and_unload()
print(type(merged).__name__, type(merged.model.layers[0].self_attn.q_proj).__name__)
with torch.no_grad():
    merged_logits = merged(input_ids=batch).logits
torch.testing.assert_close(merged_logits, ours, rtol=1e-4, atol=1e-4)
print("merged model gives the same logits, max |diff| =", (merged_logits - ours).abs().max().item())
