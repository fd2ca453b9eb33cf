"""A tiny GPT pretraining script for Megatron's training loop as the megatron-core wheel ships it (0.19+).

The megatron-core wheel carries ``megatron/training`` but not Megatron-LM's ``pretrain_gpt.py``; this is our own
minimal script for that loop (``tests/test_megatron_training_wheel.py`` runs it on gloo ranks)::

    torchrun --nproc-per-node 4 -m mindspeed_cp.launch tests/wheel_pretrain.py \\
        --context-parallel-size 4 --context-parallel-algo megatron_cp_algo --transformer-impl local ...

Model: megatron-core's GPTModel with the local layer spec, sized by Megatron's flags. Data: deterministic random
tokens (sample ``i`` is drawn from seed ``--seed + i``: a random segment, repeated), labels the next tokens,
every token in the loss. The batch
split goes through ``megatron.core.utils.get_batch_on_this_cp_rank`` (the plugin's, per algorithm); the loss
function returns ``(loss sum, token count, report)`` as Megatron's GPT loss does.
"""

from functools import partial

import torch
from megatron.core import parallel_state as mpu
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.utils import get_batch_on_this_cp_rank
from megatron.training import get_args, pretrain
from megatron.training.argument_utils import pretrain_cfg_container_from_args
from megatron.training.arguments import core_transformer_config_from_args, parse_and_validate_args


class RandomTokens(torch.utils.data.Dataset):
    """``size`` samples of ``seq_length`` random tokens; the same sample for the same index on every rank."""

    def __init__(self, size, seq_length, vocab_size, seed):
        self.size, self.seq_length, self.vocab_size, self.seed = size, seq_length, vocab_size, seed

    def __len__(self):
        return self.size

    def __getitem__(self, idx):
        g = torch.Generator().manual_seed(self.seed + int(idx))
        # a random segment of 48 tokens, repeated: the next token is predictable from 48 back, so attention
        # has to reach across the ranks' chunks of the sequence
        text = torch.randint(0, self.vocab_size, (48,), generator=g).repeat(self.seq_length // 48 + 1)
        text = text[: self.seq_length + 1]
        return {
            "tokens": text[:-1],
            "labels": text[1:],
            "loss_mask": torch.ones(self.seq_length),
            "position_ids": torch.arange(self.seq_length),
        }


def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
    args = get_args()
    return GPTModel(
        config=core_transformer_config_from_args(args),
        transformer_layer_spec=get_gpt_layer_local_spec(normalization=args.normalization),
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_base=args.rotary_base,
        pg_collection=pg_collection,
        vp_stage=vp_stage,
    )


def train_valid_test_datasets_provider(num_samples):
    args = get_args()
    train = RandomTokens(num_samples[0], args.seq_length, args.vocab_size, args.seed)
    return train, None, None  # no validation / test (--eval-iters 0)


def loss_func(loss_mask, output_tensor):
    """Sum of this rank's token losses, its token count, and both for Megatron's reduced ``lm loss``."""
    mask = loss_mask.view(-1).float()
    loss = torch.sum(output_tensor.view(-1).float() * mask)
    num_tokens = mask.sum().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.detach().view(1), num_tokens.view(1)])}


def forward_step(data_iterator, model):
    batch = {k: v.cuda() for k, v in next(data_iterator).items()}  # the CPU where there is no GPU (the plugin)
    batch = get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=mpu.get_context_parallel_group())
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


if __name__ == "__main__":
    args = parse_and_validate_args()
    pretrain(
        pretrain_cfg_container_from_args(args),
        train_valid_test_datasets_provider,
        ModelType.encoder_or_decoder,
        forward_step,
        model_provider=model_provider,
    )
