//! Byte-level BPE (`tokenizer.ggml.model = "gpt2"`) as a `tokenizers::Tokenizer`:
//!
//! ```text
//! fragment --Split(regex 1, Isolated)..Split(regex k)--> words --ByteLevel--> GPT-2 byte chars --BPE(merges)--> ids
//! ```
//!
//! The pre-tokenizer regexes come from llama.cpp (`llm_tokenizer_bpe` in src/llama-vocab.cpp), chosen by
//! `tokenizer.ggml.pre`. llama.cpp runs hand-written matchers equivalent to these regexes; `tokenizers` runs
//! them with Oniguruma. The contraction group is written `'[sS]` etc. (llama.cpp's ASCII-only reading of
//! `(?i:'s|...)`), so Unicode case folding cannot widen it. An unknown pre-tokenizer is an error: a wrong
//! guess would silently change every prompt's tokens.
//!
//! BPE itself (lowest merge rank first, ties leftmost; with `ignore_merges` a word that is a whole vocab
//! token is taken as is) is the same algorithm in both. Duplicate merges keep their first rank, as
//! llama.cpp's `bpe_ranks.emplace` does.

use std::collections::HashSet;

use tokenizers::models::bpe::{Vocab as BpeVocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::SplitDelimiterBehavior;

use super::vocab::Vocab;
use super::TokenizerError;
use crate::gguf::{keys, GgufFile};

const RE_GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const RE_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_DIGIT: &str = r"\p{N}";

/// What a pre-tokenizer name means: its regexes (applied in turn) and the vocab flags llama.cpp sets with it.
pub(crate) struct PreSpec {
    pub regexes: &'static [&'static str],
    /// A word that is a whole vocab token skips the merges.
    pub ignore_merges: bool,
    /// Default for add_bos (metadata overrides it).
    pub add_bos: bool,
    /// llama.cpp's detokenizer clean-up of " ," " 's" etc.
    pub clean_spaces: bool,
}

const LLAMA3: &[&str] = &[RE_LLAMA3];
const GPT2: &[&str] = &[RE_GPT2];
const SMOLLM: &[&str] = &[RE_DIGIT, RE_GPT2];
const QWEN2: &[&str] = &[RE_QWEN2];

/// `tokenizer.ggml.pre` names pagellm supports, grouped as llama.cpp groups them:
/// (name, regexes, ignore_merges, add_bos default, clean_spaces).
const PRE_TYPES: &[(&str, &[&str], bool, bool, bool)] = &[
    // LLAMA_VOCAB_PRE_TYPE_LLAMA3
    ("llama3", LLAMA3, true, true, true),
    ("llama-v3", LLAMA3, true, true, true),
    ("llama-bpe", LLAMA3, true, true, true),
    ("falcon3", LLAMA3, true, true, true),
    ("falcon-h1", LLAMA3, true, true, true),
    ("pixtral", LLAMA3, true, true, true),
    ("midm-2.0", LLAMA3, true, true, true),
    ("lfm2", LLAMA3, true, true, true),
    // DBRX / SMAUG: the llama3 regex without its flags
    ("dbrx", LLAMA3, false, false, true),
    ("smaug-bpe", LLAMA3, false, false, true),
    // LLAMA_VOCAB_PRE_TYPE_GPT2 (and MPT, OLMO, JAIS, TRILLION, GRANITE_DOCLING)
    ("gpt-2", GPT2, false, false, true),
    ("phi-2", GPT2, false, false, true),
    ("gigachat", GPT2, false, false, true),
    ("a.x-4.0", GPT2, false, false, true),
    ("mellum", GPT2, false, false, true),
    ("exaone4", GPT2, false, false, true),
    ("mpt", GPT2, false, false, true),
    ("olmo", GPT2, false, false, true),
    ("jais", GPT2, false, false, true),
    ("trillion", GPT2, false, false, false),
    ("granite-docling", GPT2, false, false, false),
    // LLAMA_VOCAB_PRE_TYPE_SMOLLM and its regex twins: digits split one by one, then GPT-2
    ("smollm", SMOLLM, false, false, false),
    ("starcoder", SMOLLM, false, false, true),
    ("refact", SMOLLM, false, false, true),
    ("command-r", SMOLLM, false, false, false),
    ("codeshell", SMOLLM, false, false, true),
    ("exaone", SMOLLM, false, false, true),
    ("minerva-7b", SMOLLM, false, false, true),
    ("mellum2", SMOLLM, false, false, true),
    // LLAMA_VOCAB_PRE_TYPE_QWEN2 (and STABLELM2, HUNYUAN, SOLAR_OPEN)
    ("qwen2", QWEN2, false, false, false),
    ("deepseek-r1-qwen", QWEN2, false, false, false),
    ("kormo", QWEN2, false, false, false),
    ("f2llmv2", QWEN2, false, false, false),
    ("megrez", QWEN2, false, false, true),
    ("stablelm2", QWEN2, false, false, true),
    ("hunyuan", QWEN2, false, false, false),
    ("solar-open", QWEN2, false, false, false),
];

/// The supported names, for error messages.
pub(crate) fn supported_pre_types() -> String {
    PRE_TYPES.iter().map(|p| p.0).collect::<Vec<_>>().join(", ")
}

/// Look up `tokenizer.ggml.pre`; `None` (absent) and unknown names are errors.
pub(crate) fn pre_spec(name: Option<&str>) -> Result<PreSpec, TokenizerError> {
    let found = name.unwrap_or("");
    PRE_TYPES
        .iter()
        .find(|p| p.0 == found)
        .map(|&(_, regexes, ignore_merges, add_bos, clean_spaces)| PreSpec {
            regexes,
            ignore_merges,
            add_bos,
            clean_spaces,
        })
        .ok_or_else(|| TokenizerError::UnknownPre {
            found: name.map_or_else(|| "(missing)".to_string(), |s| format!("'{s}'")),
            supported: supported_pre_types(),
        })
}

/// The `tokenizers` pipeline for one vocab. Special tokens are not registered with it: they are cut out
/// of the text beforehand (see `special.rs`), so every fragment it sees is plain text.
pub(crate) struct Bpe {
    tokenizer: tokenizers::Tokenizer,
}

impl Bpe {
    pub fn build(file: &GgufFile, vocab: &Vocab, spec: &PreSpec) -> Result<Bpe, TokenizerError> {
        let key = keys::TOKENIZER_MERGES;
        let list = file.get(key).ok_or(TokenizerError::Missing { key })?;
        let list = list.as_array().ok_or(TokenizerError::BadValue { key, problem: "not an array".into() })?;
        let mut seen = HashSet::with_capacity(list.len());
        let mut merges = Vec::with_capacity(list.len());
        for (i, v) in list.iter().enumerate() {
            let bad = || TokenizerError::BadValue { key, problem: format!("entry {i} is not a string") };
            let s = v.as_str().ok_or_else(bad)?;
            // As llama.cpp: split at the first space after the first byte; a merge without one is ignored.
            let Some(at) = s.as_bytes().iter().skip(1).position(|&b| b == b' ').map(|p| p + 1) else { continue };
            let pair = (s[..at].to_string(), s[at + 1..].to_string());
            if seen.insert(pair.clone()) {
                merges.push(pair);
            }
        }
        let bpe_vocab: BpeVocab = vocab.texts.iter().enumerate().map(|(id, t)| (t.clone(), id as u32)).collect();
        let model = BPE::builder()
            .vocab_and_merges(bpe_vocab, merges)
            .ignore_merges(spec.ignore_merges)
            .build()
            .map_err(|e| TokenizerError::Bpe(e.to_string()))?;

        let mut steps: Vec<PreTokenizerWrapper> = Vec::new();
        for re in spec.regexes {
            let split = Split::new(SplitPattern::Regex(re.to_string()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| TokenizerError::Bpe(format!("pre-tokenizer regex {re}: {e}")))?;
            steps.push(split.into());
        }
        steps.push(ByteLevel::new(false, false, false).into());
        let mut tokenizer = tokenizers::Tokenizer::new(model);
        tokenizer.with_pre_tokenizer(Some(Sequence::new(steps)));
        Ok(Bpe { tokenizer })
    }

    /// Append the ids of one plain-text fragment.
    pub fn encode(&self, text: &str, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
        let enc = self.tokenizer.encode_fast(text, false).map_err(|e| TokenizerError::Encode(e.to_string()))?;
        out.extend_from_slice(enc.get_ids());
        Ok(())
    }
}
