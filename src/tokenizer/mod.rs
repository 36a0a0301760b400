//! Text <-> token ids from the vocab inside a GGUF file, giving the ids llama.cpp gives.
//!
//! ```text
//! encode:  text --special.rs: cut out special-token text--> fragments
//!               --spm.rs (llama) | bpe.rs (gpt2, a `tokenizers::Tokenizer`)--> ids, plus BOS/EOS per flags
//! decode:  ids --decode.rs: pieces, leading-space strip, clean_spaces--> bytes --lossy UTF-8--> text
//! ```
//!
//! Contract: for the vocab types and pre-tokenizers it accepts, `encode` returns llama.cpp's
//! `llama_tokenize` ids and `decode` llama.cpp's `llama_detokenize` text (remove_special = false,
//! unparse_special = false); `tests/tokenizer_parity.rs` holds this against fixtures written by llama.cpp.
//! Anything else (an unknown `tokenizer.ggml.model` or `tokenizer.ggml.pre`) is refused at load with the
//! list of supported names, never guessed. Only `tokenizer.*` metadata (and `general.name`) is read.
//!
//! Why llama.cpp and not the HF tokenizer.json: the model's GGUF is the only input pagellm has, and
//! llama.cpp is the reference the project's outputs are compared with. Where the two differ (SentencePiece
//! segmentation, user-defined tokens, whitespace clean-up), llama.cpp wins.

mod bpe;
mod decode;
mod special;
mod spm;
mod vocab;

use crate::gguf::{keys, GgufFile};
use special::Fragment;
use vocab::{Defaults, Vocab};

pub use decode::{Decoder, StreamDecoder};
pub use vocab::VocabKind;

/// `tokenizer.ggml.model` values pagellm implements.
const SUPPORTED_MODELS: &str = "gpt2 (byte-level BPE), llama (SentencePiece)";

/// What can go wrong building a tokenizer from GGUF metadata, or encoding with it.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("the GGUF file has no '{key}': it carries no tokenizer pagellm can use")]
    Missing { key: &'static str },
    #[error("'{key}' is malformed: {problem}")]
    BadValue { key: &'static str, problem: String },
    #[error("unsupported tokenizer model '{found}' (tokenizer.ggml.model); pagellm supports {SUPPORTED_MODELS}")]
    UnknownModel { found: String },
    #[error("unsupported pre-tokenizer {found} (tokenizer.ggml.pre) for a gpt2 BPE vocab; pagellm does not guess \
             one, as a wrong guess silently changes every prompt's tokens. Supported: {supported}")]
    UnknownPre { found: String, supported: String },
    #[error("building the BPE tokenizer from tokenizer.ggml.merges failed: {0}")]
    Bpe(String),
    #[error("BPE encoding failed: {0}")]
    Encode(String),
    #[error("the vocab has no {what} token (tokenizer.ggml.{what}_token_id absent and the default id is outside \
             the vocab); pagellm needs one to frame sequences")]
    NoSpecialToken { what: &'static str },
    #[error("the vocab has no byte token <0x{byte:02X}> for a character it cannot spell otherwise")]
    NoByteToken { byte: u8 },
}

enum Model {
    Spm,
    Bpe(Box<bpe::Bpe>),
}

/// A tokenizer for one model's vocab. Cheap to share (`Send + Sync`); build it once per model.
pub struct Tokenizer {
    vocab: Vocab,
    pieces: decode::Pieces,
    model: Model,
    pre: Option<String>,
    /// Checked present at load: every vocab pagellm runs has both.
    bos: u32,
    eos: u32,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.vocab.kind)
            .field("pre", &self.pre)
            .field("n_vocab", &self.n_vocab())
            .field("bos", &self.bos_id())
            .field("eos", &self.eos_id())
            .field("eot", &self.eot_id())
            .field("add_bos", &self.add_bos())
            .finish()
    }
}

impl Tokenizer {
    /// Build from the `tokenizer.*` metadata of a GGUF file.
    pub fn from_gguf(file: &GgufFile) -> Result<Tokenizer, TokenizerError> {
        let key = keys::TOKENIZER_MODEL;
        let model = file.get_str(key).ok_or(TokenizerError::Missing { key })?;
        let (kind, spec) = match model {
            "llama" => (VocabKind::Spm, None),
            "gpt2" => (VocabKind::Bpe, Some(bpe::pre_spec(file.get_str(keys::TOKENIZER_PRE))?)),
            other => return Err(TokenizerError::UnknownModel { found: other.to_string() }),
        };
        let defaults = match &spec {
            None => Defaults { add_bos: true, add_eos: false, add_space_prefix: true, clean_spaces: false },
            Some(s) => {
                Defaults { add_bos: s.add_bos, add_eos: false, add_space_prefix: false, clean_spaces: s.clean_spaces }
            }
        };
        let vocab = Vocab::load(file, kind, defaults)?;
        let model = match &spec {
            None => Model::Spm,
            Some(s) => Model::Bpe(Box::new(bpe::Bpe::build(file, &vocab, s)?)),
        };
        let pieces = decode::Pieces::build(&vocab);
        let pre = spec.and(file.get_str(keys::TOKENIZER_PRE).map(str::to_string));
        let bos = vocab.ids.bos.ok_or(TokenizerError::NoSpecialToken { what: "bos" })?;
        let eos = vocab.ids.eos.ok_or(TokenizerError::NoSpecialToken { what: "eos" })?;
        Ok(Tokenizer { vocab, pieces, model, pre, bos, eos })
    }

    /// Token ids of `text`. `add_special` adds BOS / EOS where the vocab's add_bos / add_eos flags say so;
    /// `parse_special` lets control-token text (`<|im_start|>`, `<start_of_turn>`) become those tokens
    /// (user-defined tokens are always recognised, as in llama.cpp).
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let v = &self.vocab;
        let mut out = Vec::new();
        if add_special && v.add_bos {
            out.push(self.bos);
        }
        let fragments = special::partition(v, text, parse_special);
        match &self.model {
            Model::Spm => {
                // A fragment at the start or right after a special token gets the space prefix.
                let mut prev_special = true;
                for frag in fragments {
                    match frag {
                        Fragment::Text(t) => {
                            let prefix = if v.add_space_prefix && prev_special { " " } else { "" };
                            let escaped = format!("{prefix}{t}").replace(' ', "▁");
                            spm::tokenize(v, &escaped, &mut out)?;
                            prev_special = false;
                        }
                        Fragment::Token(id) => {
                            out.push(id);
                            prev_special = true;
                        }
                    }
                }
            }
            Model::Bpe(bpe) => {
                for frag in fragments {
                    match frag {
                        Fragment::Text(t) => bpe.encode(t, &mut out)?,
                        Fragment::Token(id) => out.push(id),
                    }
                }
            }
        }
        if add_special && v.add_eos {
            out.push(self.eos);
        }
        Ok(out)
    }

    /// Text of `ids` as llama.cpp `llama_detokenize(remove_special = false, unparse_special = false)`:
    /// control tokens render to nothing; invalid UTF-8 becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        String::from_utf8_lossy(&self.detokenize(ids, false, false)).into_owned()
    }

    /// Raw bytes of `ids`, as llama.cpp `llama_detokenize(remove_special, unparse_special)`.
    /// `remove_special` drops a leading BOS / trailing EOS that the vocab adds; `unparse_special` renders
    /// control tokens as their text.
    pub fn detokenize(&self, ids: &[u32], remove_special: bool, unparse_special: bool) -> Vec<u8> {
        decode::detokenize(self, ids, remove_special, unparse_special)
    }

    /// Raw bytes of one token as llama.cpp renders it with `special = true` (its token-to-piece cache, and
    /// `common_token_to_piece`'s default): control tokens show their text. Empty for ids out of range.
    pub fn token_to_piece(&self, id: u32) -> Vec<u8> {
        self.piece(id, true).to_vec()
    }

    /// One token's bytes as llama.cpp `llama_token_to_piece(.., lstrip = 0, special)`.
    pub fn piece(&self, id: u32, special: bool) -> &[u8] {
        self.pieces.get(&self.vocab, id, special)
    }

    /// A streaming decoder over this tokenizer (see [`StreamDecoder`]).
    pub fn stream_decoder(&self) -> StreamDecoder<&Tokenizer> {
        StreamDecoder::new(self)
    }

    pub fn n_vocab(&self) -> usize {
        self.vocab.n_vocab()
    }

    pub fn kind(&self) -> VocabKind {
        self.vocab.kind
    }

    /// `tokenizer.ggml.pre` of a BPE vocab (SPM vocabs have none that matters).
    pub fn pre(&self) -> Option<&str> {
        self.pre.as_deref()
    }

    /// Beginning of sequence (`tokenizer.ggml.bos_token_id`, else llama.cpp's default for the vocab type).
    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    /// End of sequence (`tokenizer.ggml.eos_token_id`, else llama.cpp's default for the vocab type).
    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    /// End-of-turn: `tokenizer.ggml.eot_token_id`, else found by text (`<|im_end|>`, `<end_of_turn>`, ...).
    pub fn eot_id(&self) -> Option<u32> {
        self.vocab.ids.eot
    }

    pub fn unk_id(&self) -> Option<u32> {
        self.vocab.ids.unk
    }

    pub fn pad_id(&self) -> Option<u32> {
        self.vocab.ids.pad
    }

    /// Whether `encode(.., add_special = true, ..)` starts with BOS.
    pub fn add_bos(&self) -> bool {
        self.vocab.add_bos
    }

    /// Whether `encode(.., add_special = true, ..)` ends with EOS.
    pub fn add_eos(&self) -> bool {
        self.vocab.add_eos
    }

    /// End of generation, as llama.cpp decides: EOS, EOT, EOM, FIM pad/repo/sep, and tokens whose text is
    /// on llama.cpp's list (`<|im_end|>`, `<end_of_turn>`, `<|endoftext|>`, `</s>`, ...).
    pub fn is_eog(&self, id: u32) -> bool {
        self.vocab.is_eog(id)
    }

    /// All end-of-generation ids, ascending.
    pub fn eog_ids(&self) -> &[u32] {
        &self.vocab.eog
    }

    /// Control token (rendered only with `special`, matched only with `parse_special`).
    pub fn is_control(&self, id: u32) -> bool {
        self.vocab.attr(id) & vocab::attr::CONTROL != 0
    }

    /// The token's text as stored in the vocab (`▁` for SPM spaces, `Ġ` etc. for BPE bytes).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.vocab.texts.get(id as usize).map(String::as_str)
    }

    /// The id whose stored text is exactly `text` (for special tokens: `token_id("<|im_end|>")`).
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.vocab.to_id.get(text).copied()
    }
}

// The engine shares one tokenizer across threads.
const _: fn() = || {
    fn shareable<T: Send + Sync>() {}
    shareable::<Tokenizer>();
};
