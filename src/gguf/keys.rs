//! Every GGUF metadata key pagellm reads or writes, in one table. Per-architecture keys are formats
//! over the architecture name (`{arch}.block_count`); use [`arch_key`] to fill them in.

pub const ARCHITECTURE: &str = "general.architecture";
pub const NAME: &str = "general.name";
pub const ALIGNMENT: &str = "general.alignment";
pub const FILE_TYPE: &str = "general.file_type";
pub const QUANTIZATION_VERSION: &str = "general.quantization_version";

// Per-architecture (suffixes after "{arch}.").
pub const CONTEXT_LENGTH: &str = "context_length";
pub const EMBEDDING_LENGTH: &str = "embedding_length";
pub const BLOCK_COUNT: &str = "block_count";
pub const FEED_FORWARD_LENGTH: &str = "feed_forward_length";
pub const HEAD_COUNT: &str = "attention.head_count";
pub const HEAD_COUNT_KV: &str = "attention.head_count_kv";
pub const KEY_LENGTH: &str = "attention.key_length";
pub const VALUE_LENGTH: &str = "attention.value_length";
pub const RMS_EPS: &str = "attention.layer_norm_rms_epsilon";
pub const SLIDING_WINDOW: &str = "attention.sliding_window";
pub const ROPE_DIMENSION_COUNT: &str = "rope.dimension_count";
pub const ROPE_FREQ_BASE: &str = "rope.freq_base";
pub const ROPE_SCALING_TYPE: &str = "rope.scaling.type";
pub const ROPE_SCALING_FACTOR: &str = "rope.scaling.factor";
pub const VOCAB_SIZE: &str = "vocab_size";

// Tokenizer.
pub const TOKENIZER_MODEL: &str = "tokenizer.ggml.model";
pub const TOKENIZER_PRE: &str = "tokenizer.ggml.pre";
pub const TOKENIZER_TOKENS: &str = "tokenizer.ggml.tokens";
pub const TOKENIZER_SCORES: &str = "tokenizer.ggml.scores";
pub const TOKENIZER_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
pub const TOKENIZER_MERGES: &str = "tokenizer.ggml.merges";
pub const TOKENIZER_BOS_ID: &str = "tokenizer.ggml.bos_token_id";
pub const TOKENIZER_EOS_ID: &str = "tokenizer.ggml.eos_token_id";
pub const TOKENIZER_EOT_ID: &str = "tokenizer.ggml.eot_token_id";
pub const TOKENIZER_UNK_ID: &str = "tokenizer.ggml.unknown_token_id";
pub const TOKENIZER_PAD_ID: &str = "tokenizer.ggml.padding_token_id";
pub const TOKENIZER_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
pub const TOKENIZER_ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
pub const TOKENIZER_ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
pub const CHAT_TEMPLATE: &str = "tokenizer.chat_template";

/// `"{arch}.{suffix}"`, e.g. `arch_key("llama", BLOCK_COUNT)` is `"llama.block_count"`.
pub fn arch_key(arch: &str, suffix: &str) -> String {
    format!("{arch}.{suffix}")
}
