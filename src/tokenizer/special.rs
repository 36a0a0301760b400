//! Cutting special-token text out of the input before the model tokenizer sees it, as llama.cpp
//! `tokenizer_st_partition`:
//!
//! ```text
//!  "Hi<|im_end|>\nthere"  ->  [Text("Hi"), Token(<|im_end|>), Text("\nthere")]
//! ```
//!
//! Special tokens are tried longest text first; each one splits every text fragment left at all its
//! occurrences. Control and unknown tokens are matched only when `parse_special` is set; user-defined
//! tokens (gemma's `\n\n`, `<table>`, runs of spaces and tabs) always are, as in llama.cpp and HF.
//! A token with LSTRIP / RSTRIP eats the ASCII whitespace before / after it.

use super::vocab::{attr, Vocab};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

/// C `isspace` in the "C" locale.
fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

pub(crate) fn partition<'a>(vocab: &Vocab, text: &'a str, parse_special: bool) -> Vec<Fragment<'a>> {
    let mut frags = if text.is_empty() { Vec::new() } else { vec![Fragment::Text(text)] };
    // Bytes present in the input: a special token whose first byte is absent cannot occur (saves time
    // with gemma's ~6,400 special tokens).
    let mut present = [false; 256];
    for &b in text.as_bytes() {
        present[b as usize] = true;
    }
    for &id in &vocab.special_cache {
        let a = vocab.attr(id);
        if !parse_special && a & (attr::CONTROL | attr::UNKNOWN) != 0 {
            continue;
        }
        let special = vocab.texts[id as usize].as_str();
        if !present[special.as_bytes()[0] as usize] {
            continue;
        }
        if !frags.iter().any(|f| matches!(f, Fragment::Text(t) if t.contains(special))) {
            continue;
        }
        let mut next = Vec::with_capacity(frags.len() + 2);
        for frag in frags {
            match frag {
                Fragment::Text(t) => split_one(t, special, id, a, &mut next),
                token => next.push(token),
            }
        }
        frags = next;
    }
    frags
}

/// Split `text` at every occurrence of `special`, pushing the pieces to `out`.
fn split_one<'a>(mut text: &'a str, special: &str, id: u32, a: u16, out: &mut Vec<Fragment<'a>>) {
    while let Some(at) = text.find(special) {
        let mut left = &text[..at];
        if a & attr::LSTRIP != 0 {
            left = left.trim_end_matches(|c: char| c.is_ascii() && is_c_space(c as u8));
        }
        if !left.is_empty() {
            out.push(Fragment::Text(left));
        }
        out.push(Fragment::Token(id));
        text = &text[at + special.len()..];
        if a & attr::RSTRIP != 0 {
            text = text.trim_start_matches(|c: char| c.is_ascii() && is_c_space(c as u8));
        }
    }
    if !text.is_empty() {
        out.push(Fragment::Text(text));
    }
}
