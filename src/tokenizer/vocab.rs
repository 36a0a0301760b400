//! The vocab as llama.cpp loads it (`llama_vocab::impl::load` in src/llama-vocab.cpp): token texts,
//! scores and attributes, the special ids, the end-of-generation set, and the order in which special-token
//! text is matched. Only the `tokenizer.*` metadata is read; nothing else of the model is touched.
//!
//! llama.cpp finds some special tokens by their text (EOT, EOM, FIM, the EOG list) while iterating a
//! `std::unordered_map`, so when several texts qualify its pick depends on hash order. We take the lowest
//! id, which is what llama.cpp picks on the test models (SmolLM2: EOT = `<|endoftext|>` = 0).

use std::collections::HashMap;

use super::TokenizerError;
use crate::gguf::{keys, GgufFile, Value};

// Keys that only the tokenizer reads and that `gguf::keys` does not list (llama-arch.cpp LLM_KV_TOKENIZER_*).
const KEY_EOM_ID: &str = "tokenizer.ggml.eom_token_id";
const KEY_FIM_PRE_ID: &str = "tokenizer.ggml.fim_pre_token_id";
const KEY_FIM_SUF_ID: &str = "tokenizer.ggml.fim_suf_token_id";
const KEY_FIM_MID_ID: &str = "tokenizer.ggml.fim_mid_token_id";
const KEY_FIM_PAD_ID: &str = "tokenizer.ggml.fim_pad_token_id";
const KEY_FIM_REP_ID: &str = "tokenizer.ggml.fim_rep_token_id";
const KEY_FIM_SEP_ID: &str = "tokenizer.ggml.fim_sep_token_id";
const KEY_PREFIX_ID: &str = "tokenizer.ggml.prefix_token_id"; // deprecated FIM names
const KEY_SUFFIX_ID: &str = "tokenizer.ggml.suffix_token_id";
const KEY_MIDDLE_ID: &str = "tokenizer.ggml.middle_token_id";

/// Token attributes, bit for bit llama.h's `llama_token_attr`.
pub mod attr {
    pub const UNKNOWN: u16 = 1 << 0;
    pub const UNUSED: u16 = 1 << 1;
    pub const NORMAL: u16 = 1 << 2;
    pub const CONTROL: u16 = 1 << 3;
    pub const USER_DEFINED: u16 = 1 << 4;
    pub const BYTE: u16 = 1 << 5;
    pub const LSTRIP: u16 = 1 << 7;
    pub const RSTRIP: u16 = 1 << 8;
}

/// `tokenizer.ggml.token_type` value -> attribute (llama.h `llama_token_type`).
fn attr_from_type(ty: i64) -> u16 {
    match ty {
        1 => attr::NORMAL,
        2 => attr::UNKNOWN,
        3 => attr::CONTROL,
        4 => attr::USER_DEFINED,
        5 => attr::UNUSED,
        6 => attr::BYTE,
        _ => 0, // UNDEFINED: rendered as nothing, never matched as special text
    }
}

// Texts llama.cpp recognises (llama-vocab.cpp, "auto-detect special tokens by text").
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>", "_<EOT>",
    "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>",
];
const EOM_TEXTS: &[&str] = &["<|eom_id|>"];
const FIM_PRE_TEXTS: &[&str] = &[
    "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>", "<|code_prefix|>", "<|prefix|>",
];
const FIM_SUF_TEXTS: &[&str] = &[
    "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>", "<|code_suffix|>", "<|suffix|>",
];
const FIM_MID_TEXTS: &[&str] = &[
    "<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>", "<|code_middle|>", "<|middle|>",
];
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_TEXTS: &[&str] = &["<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~[",
];
/// gpt-oss: always rendered, never control.
const ALWAYS_USER_TEXTS: &[&str] = &["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"];

/// SentencePiece (`llama`) or byte-level BPE (`gpt2`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VocabKind {
    Spm,
    Bpe,
}

/// Defaults that depend on the tokenizer model and pre-tokenizer, before metadata overrides them.
pub(crate) struct Defaults {
    pub add_bos: bool,
    pub add_eos: bool,
    pub add_space_prefix: bool,
    pub clean_spaces: bool,
}

/// Selects one field of [`SpecialIds`], so tables of keys and texts can name their target.
type Slot = fn(&mut SpecialIds) -> &mut Option<u32>;

/// The special ids llama.cpp tracks. `None` is LLAMA_TOKEN_NULL.
#[derive(Clone, Debug, Default)]
pub(crate) struct SpecialIds {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub eot: Option<u32>,
    pub eom: Option<u32>,
    pub unk: Option<u32>,
    pub pad: Option<u32>,
    pub fim_pre: Option<u32>,
    pub fim_suf: Option<u32>,
    pub fim_mid: Option<u32>,
    pub fim_pad: Option<u32>,
    pub fim_rep: Option<u32>,
    pub fim_sep: Option<u32>,
}

pub(crate) struct Vocab {
    pub kind: VocabKind,
    /// id -> text, as stored (SPM spaces are `▁`, BPE bytes are GPT-2 byte-level characters).
    pub texts: Vec<String>,
    /// id -> score (SPM merge priority; 0 when the file has none).
    pub scores: Vec<f32>,
    /// id -> [`attr`] bits.
    pub attrs: Vec<u16>,
    /// text -> id; for duplicate texts the last id wins, as in llama.cpp.
    pub to_id: HashMap<String, u32>,
    pub ids: SpecialIds,
    pub add_bos: bool,
    pub add_eos: bool,
    pub add_space_prefix: bool,
    pub clean_spaces: bool,
    /// End-of-generation ids, sorted.
    pub eog: Vec<u32>,
    /// Control, user-defined and unknown tokens, longest text first: the order text is matched against them.
    pub special_cache: Vec<u32>,
}

impl Vocab {
    pub fn load(file: &GgufFile, kind: VocabKind, defaults: Defaults) -> Result<Vocab, TokenizerError> {
        let (texts, to_id) = read_tokens(file)?;
        let n = texts.len();
        let scores = read_scores(file, n)?;
        let attrs = read_attrs(file, n)?;
        let mut v = Vocab {
            kind,
            texts,
            scores,
            attrs,
            to_id,
            ids: SpecialIds::default(),
            add_bos: defaults.add_bos,
            add_eos: defaults.add_eos,
            add_space_prefix: file.get(keys::TOKENIZER_ADD_SPACE_PREFIX).and_then(Value::as_bool)
                .unwrap_or(defaults.add_space_prefix),
            clean_spaces: defaults.clean_spaces,
            eog: Vec::new(),
            special_cache: Vec::new(),
        };
        v.read_special_ids(file);
        if let Some(b) = file.get(keys::TOKENIZER_ADD_BOS).and_then(Value::as_bool) {
            v.add_bos = b;
        }
        if let Some(b) = file.get(keys::TOKENIZER_ADD_EOS).and_then(Value::as_bool) {
            v.add_eos = b;
        }
        v.detect_special_by_text();
        v.mark_unused();
        v.build_eog();
        v.build_special_cache();
        v.apply_model_attrs(file);
        Ok(v)
    }

    pub fn n_vocab(&self) -> usize {
        self.texts.len()
    }

    pub fn attr(&self, id: u32) -> u16 {
        self.attrs.get(id as usize).copied().unwrap_or(0)
    }

    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// The id of a byte-fallback token (`<0xAB>`, else the one-byte text), as llama.cpp `byte_to_token`.
    pub fn byte_to_token(&self, byte: u8) -> Option<u32> {
        match self.kind {
            VocabKind::Spm => self.to_id.get(format!("<0x{byte:02X}>").as_str()).copied().or_else(|| {
                std::str::from_utf8(&[byte]).ok().and_then(|s| self.to_id.get(s).copied())
            }),
            VocabKind::Bpe => self.to_id.get(super::decode::byte_to_unicode(byte).to_string().as_str()).copied(),
        }
    }

    /// Ids whose text is one of `texts`, ascending (a duplicated text resolves to its last id, as in
    /// llama.cpp's text -> id map).
    fn ids_with_text(&self, texts: &[&str]) -> Vec<u32> {
        let mut ids: Vec<u32> = texts.iter().filter_map(|t| self.to_id.get(*t).copied()).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    fn read_special_ids(&mut self, file: &GgufFile) {
        let n = self.n_vocab() as u64;
        // Built-in defaults per model type; a default outside the vocab is dropped.
        let (bos, eos, unk) = match self.kind {
            VocabKind::Spm => (Some(1), Some(2), Some(0)),
            VocabKind::Bpe => (Some(11), Some(11), None),
        };
        let in_range = |id: Option<u32>| id.filter(|&i| (i as u64) < n);
        let mut ids = SpecialIds { bos: in_range(bos), eos: in_range(eos), unk: in_range(unk), ..Default::default() };
        let table: [(&str, Slot); 15] = [
            (keys::TOKENIZER_BOS_ID, |s| &mut s.bos),
            (keys::TOKENIZER_EOS_ID, |s| &mut s.eos),
            (keys::TOKENIZER_EOT_ID, |s| &mut s.eot),
            (KEY_EOM_ID, |s| &mut s.eom),
            (keys::TOKENIZER_UNK_ID, |s| &mut s.unk),
            (keys::TOKENIZER_PAD_ID, |s| &mut s.pad),
            (KEY_FIM_PRE_ID, |s| &mut s.fim_pre),
            (KEY_FIM_SUF_ID, |s| &mut s.fim_suf),
            (KEY_FIM_MID_ID, |s| &mut s.fim_mid),
            (KEY_FIM_PAD_ID, |s| &mut s.fim_pad),
            (KEY_FIM_REP_ID, |s| &mut s.fim_rep),
            (KEY_FIM_SEP_ID, |s| &mut s.fim_sep),
            (KEY_PREFIX_ID, |s| &mut s.fim_pre),
            (KEY_SUFFIX_ID, |s| &mut s.fim_suf),
            (KEY_MIDDLE_ID, |s| &mut s.fim_mid),
        ];
        for (key, slot) in table {
            // An id outside the vocab keeps the default (llama.cpp warns "bad special token").
            if let Some(id) = file.get_u64(key).filter(|&id| id < n) {
                *slot(&mut ids) = Some(id as u32);
            }
        }
        self.ids = ids;
    }

    /// EOT, EOM and FIM tokens not named by metadata are found by text; each one found becomes control.
    fn detect_special_by_text(&mut self) {
        let groups: [(&[&str], Slot); 8] = [
            (EOT_TEXTS, |s| &mut s.eot),
            (EOM_TEXTS, |s| &mut s.eom),
            (FIM_PRE_TEXTS, |s| &mut s.fim_pre),
            (FIM_SUF_TEXTS, |s| &mut s.fim_suf),
            (FIM_MID_TEXTS, |s| &mut s.fim_mid),
            (FIM_PAD_TEXTS, |s| &mut s.fim_pad),
            (FIM_REP_TEXTS, |s| &mut s.fim_rep),
            (FIM_SEP_TEXTS, |s| &mut s.fim_sep),
        ];
        for (texts, slot) in groups {
            if slot(&mut self.ids).is_some() {
                continue;
            }
            let found = self.ids_with_text(texts).first().copied();
            if let Some(id) = found {
                *slot(&mut self.ids) = Some(id);
                self.attrs[id as usize] |= attr::CONTROL;
            }
        }
    }

    /// Control tokens whose text contains "unused" are marked unused.
    fn mark_unused(&mut self) {
        for id in 0..self.texts.len() {
            if self.attrs[id] & attr::CONTROL != 0 && self.texts[id].contains("unused") {
                self.attrs[id] |= attr::UNUSED;
            }
        }
    }

    fn build_eog(&mut self) {
        let mut eog: Vec<u32> = [self.ids.fim_pad, self.ids.fim_rep, self.ids.fim_sep].into_iter().flatten().collect();
        let by_text = self.ids_with_text(EOG_TEXTS);
        for id in by_text {
            eog.push(id);
            self.attrs[id as usize] |= attr::CONTROL;
        }
        let always_user = self.ids_with_text(ALWAYS_USER_TEXTS);
        for id in always_user {
            self.attrs[id as usize] = attr::USER_DEFINED;
        }
        eog.extend([self.ids.eos, self.ids.eot, self.ids.eom].into_iter().flatten());
        eog.sort_unstable();
        eog.dedup();
        let has = |eog: &[u32], texts: &[&str]| eog.iter().any(|&id| texts.contains(&self.texts[id as usize].as_str()));
        let find = |eog: &[u32], t: &str| eog.iter().copied().find(|&id| self.texts[id as usize] == t);
        // o200k_harmony / solar-open: "<|end|>" ends a message, not the generation.
        let harmony = has(&eog, &["<|call|>", "<|calls|>"]) && has(&eog, &["<|return|>", "<|flush|>"]);
        if let Some(end) = find(&eog, "<|end|>").filter(|_| harmony) {
            eog.retain(|&id| id != end);
            self.attrs[end as usize] = attr::USER_DEFINED;
        }
        // gemma4 and plamo have a normal "</s>".
        let normal_s = has(&eog, &["<|tool_response>", "<|plamo:eos|>"]);
        if let Some(s) = find(&eog, "</s>").filter(|_| normal_s) {
            eog.retain(|&id| id != s);
            self.attrs[s as usize] = attr::NORMAL;
        }
        self.eog = eog;
    }

    fn build_special_cache(&mut self) {
        let mask = attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN;
        let mut cache: Vec<u32> =
            (0..self.texts.len() as u32).filter(|&id| self.attrs[id as usize] & mask != 0).collect();
        // llama.cpp's sort is unstable, leaving the order of equal lengths unspecified; we keep id order.
        cache.sort_by_key(|&id| std::cmp::Reverse(self.texts[id as usize].len()));
        self.special_cache = cache;
    }

    /// Per-model attributes llama.cpp sets by name (only phi-3's right-stripping specials apply to us).
    fn apply_model_attrs(&mut self, file: &GgufFile) {
        let name = file.get_str(keys::NAME).unwrap_or("").to_lowercase();
        if !(name.contains("phi-3") || name.contains("phi3")) {
            return;
        }
        for &id in &self.special_cache {
            self.attrs[id as usize] |= attr::RSTRIP;
        }
        for (text, on) in [("</s>", true), ("<unk>", false), ("<s>", false), ("<|endoftext|>", false)] {
            if let Some(&id) = self.to_id.get(text) {
                let a = &mut self.attrs[id as usize];
                *a = if on { *a | attr::RSTRIP } else { *a & !attr::RSTRIP };
            }
        }
    }
}

fn array<'a>(file: &'a GgufFile, key: &'static str) -> Result<Option<&'a [Value]>, TokenizerError> {
    match file.get(key) {
        None => Ok(None),
        Some(v) => v.as_array().map(Some).ok_or(TokenizerError::BadValue { key, problem: "not an array".into() }),
    }
}

fn read_tokens(file: &GgufFile) -> Result<(Vec<String>, HashMap<String, u32>), TokenizerError> {
    let key = keys::TOKENIZER_TOKENS;
    let list = array(file, key)?.ok_or(TokenizerError::Missing { key })?;
    if list.len() > u32::MAX as usize / 2 {
        let problem = format!("{} tokens is more than ids can hold", list.len());
        return Err(TokenizerError::BadValue { key, problem });
    }
    let mut texts = Vec::with_capacity(list.len());
    let mut to_id = HashMap::with_capacity(list.len());
    for (i, v) in list.iter().enumerate() {
        let s = v.as_str().ok_or_else(|| TokenizerError::BadValue { key, problem: format!("entry {i} is not a string") })?;
        // llama.cpp renames empty tokens so every id keeps a distinct, non-empty text.
        let s = if s.is_empty() { format!("[EMPTY_{i}]") } else { s.to_string() };
        to_id.insert(s.clone(), i as u32);
        texts.push(s);
    }
    Ok((texts, to_id))
}

fn read_scores(file: &GgufFile, n: usize) -> Result<Vec<f32>, TokenizerError> {
    let key = keys::TOKENIZER_SCORES;
    let Some(list) = array(file, key)? else { return Ok(vec![0.0; n]) };
    if list.len() < n {
        return Err(TokenizerError::BadValue { key, problem: format!("{} scores for {n} tokens", list.len()) });
    }
    list[..n].iter().enumerate().map(|(i, v)| {
        v.as_f64().map(|s| s as f32)
            .ok_or_else(|| TokenizerError::BadValue { key, problem: format!("entry {i} is not a number") })
    }).collect()
}

fn read_attrs(file: &GgufFile, n: usize) -> Result<Vec<u16>, TokenizerError> {
    let key = keys::TOKENIZER_TOKEN_TYPE;
    let Some(list) = array(file, key)? else { return Ok(vec![attr::NORMAL; n]) };
    if list.len() < n {
        return Err(TokenizerError::BadValue { key, problem: format!("{} token types for {n} tokens", list.len()) });
    }
    list[..n].iter().enumerate().map(|(i, v)| {
        v.as_i64().map(attr_from_type)
            .ok_or_else(|| TokenizerError::BadValue { key, problem: format!("entry {i} is not an integer") })
    }).collect()
}
