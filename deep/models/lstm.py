"""Character-level LSTM language model for enwik8 (the paper's 500-unit, ~1.56 M-parameter LSTM).

Architecture: byte embedding (V symbols -> E dims) -> one LSTM layer of H units -> linear decoder (H -> V logits).
With V vocabulary symbols, embedding size E and H units, the parameter count is

    P = V*E  (embedding)  +  4H*E + 4H  (input projection, one bias per gate)  +  4H*H  (hidden projection)
        + H*V + V  (decoder)

The paper reports ~1.56 M parameters for H = 500 but not E. With the 256 byte symbols and an untied decoder,
P = 2256*E + 1,130,256, which gives 1.56 M for E = 190: P = 1,558,896 (the default here). (An equally consistent
reading is enwik8's 205 distinct bytes as the vocabulary with E = V = 205: P = 1,556,730, or 1,558,730 with
torch.nn.LSTM's second bias vector; both round to 1.56 M. A decoder tied to the embedding would need E = H = 500,
giving 2,130,256.)

The cell is written with two explicit `nn.Linear` layers, `cell.input_proj` (W_ih, bias) and `cell.hidden_proj`
(W_hh, no bias), so that module surgery can replace them with late-phase families (e.g. rank-1 factors
W_k = W * (r_k s_k^T)). Both are always called with the batch as the leading dimension: `input_proj` on (B, T, E)
in the fused path or (B, E) in the step-by-step path, `hidden_proj` on (B, H). Gates follow torch.nn.LSTM's order
(input, forget, cell, output) and equations, so weights copy into an nn.LSTM one to one (with bias_hh = 0).
"""
from __future__ import annotations

import math

import torch
from torch import nn

State = tuple[torch.Tensor, torch.Tensor]

PAPER_HIDDEN = 500
PAPER_EMBEDDING = 190
VOCAB_SIZE = 256


def parameter_count(vocab_size: int = VOCAB_SIZE, embedding_dim: int = PAPER_EMBEDDING,
                    hidden_size: int = PAPER_HIDDEN) -> int:
    """Number of parameters of `CharLSTM(vocab_size, embedding_dim, hidden_size)` (formula in the module doc)."""
    v, e, h = vocab_size, embedding_dim, hidden_size
    return v * e + 4 * h * e + 4 * h + 4 * h * h + h * v + v


PAPER_PARAMETERS = parameter_count()  # 1,558,896


class LSTMCell(nn.Module):
    """One LSTM layer, unrolled over time in Python.

    Per step, with z_t = input_proj(x_t) + hidden_proj(h_{t-1}) split into (i, f, g, o):
        c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g),   h_t = sigmoid(o) * tanh(c_t).
    Initialisation as torch.nn.LSTM: every weight and bias uniform in [-1/sqrt(H), 1/sqrt(H)].
    """

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.input_proj = nn.Linear(input_size, 4 * hidden_size)
        self.hidden_proj = nn.Linear(hidden_size, 4 * hidden_size, bias=False)
        bound = 1.0 / math.sqrt(hidden_size)
        for parameter in self.parameters():
            nn.init.uniform_(parameter, -bound, bound)

    def step(self, projected_input: torch.Tensor, state: State) -> State:
        """One time step: (B, 4H) projected input and state (h, c), each (B, H) -> new (h, c)."""
        h, c = state
        gates = projected_input + self.hidden_proj(h)
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c

    def forward(self, inputs: torch.Tensor, state: State, fused: bool = True) -> tuple[torch.Tensor, State]:
        """Run over time: inputs (B, T, input_size), state (h, c) each (B, H) -> outputs (B, T, H) and final (h, c).

        fused=True projects the inputs of all T steps in one matrix product (they do not depend on the state);
        fused=False projects step by step. Both compute the same function.
        """
        if fused:
            projected = self.input_proj(inputs)
            step_inputs = projected.unbind(1)
        else:
            step_inputs = (self.input_proj(x) for x in inputs.unbind(1))
        outputs = []
        for projected_t in step_inputs:
            state = self.step(projected_t, state)
            outputs.append(state[0])
        return torch.stack(outputs, dim=1), state


class CharLSTM(nn.Module):
    """Embedding -> LSTM -> linear decoder; defaults are the paper's enwik8 size (P = 1,558,896 parameters).

    forward(inputs (B, T) int64 symbol ids, state (h, c) each (B, H) or None for zeros)
        -> (logits (B, T, vocab_size), new state). Logits are unnormalised; the next-symbol cross-entropy in nats
        divided by ln 2 is bits per character.
    """

    def __init__(self, vocab_size: int = VOCAB_SIZE, embedding_dim: int = PAPER_EMBEDDING,
                 hidden_size: int = PAPER_HIDDEN):
        super().__init__()
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.cell = LSTMCell(embedding_dim, hidden_size)
        self.decoder = nn.Linear(hidden_size, vocab_size)

    def init_state(self, batch_size: int, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> State:
        """Zero state (h, c), each (batch_size, H), on the model's device and dtype unless given."""
        weight = self.decoder.weight
        shape = (batch_size, self.hidden_size)
        h = torch.zeros(shape, device=device or weight.device, dtype=dtype or weight.dtype)
        return h, h.clone()

    def forward(self, inputs: torch.Tensor, state: State | None = None,
                fused: bool = True) -> tuple[torch.Tensor, State]:
        if inputs.dim() != 2:
            raise ValueError(f"CharLSTM expects inputs of shape (batch, time), got {tuple(inputs.shape)}")
        if state is None:
            state = self.init_state(inputs.shape[0])
        elif state[0].shape != (inputs.shape[0], self.hidden_size):
            raise ValueError(f"state of shape {tuple(state[0].shape)} does not match batch {inputs.shape[0]} "
                             f"x hidden {self.hidden_size}")
        outputs, state = self.cell(self.embedding(inputs), state, fused=fused)
        return self.decoder(outputs), state


def detach_state(state: State) -> State:
    """The same (h, c) values cut from the autograd graph (truncated BPTT between windows)."""
    return state[0].detach(), state[1].detach()
