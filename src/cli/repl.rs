//! The interactive chat (`pagellm run MODEL` without `-p`).
//!
//! Each turn renders the WHOLE conversation with the chat template and hands its token ids to the
//! [`Engine`], whose prefix cache turns that into "prefill only the new tokens"; the reply streams to
//! stdout and is appended to the conversation as the assistant's message.
//!
//! - Input: on a terminal, a rustyline editor (history in memory; Ctrl-C clears the line, twice in a row
//!   leaves; Ctrl-D leaves). Otherwise (scripts, tests) plain lines from stdin, no prompts or escape codes.
//!   In both, one input per line, except that a line ending in `\` continues on the next one and `"""`
//!   opens a block that a line ending in `"""` closes.
//! - Ctrl-C during a reply stops that reply (the part already written stays in the conversation).
//! - Output: replies go to stdout; everything else (notes, command output, errors and one stats line per
//!   turn) goes to stderr, so `pagellm run M < script > replies.txt` keeps only the replies.
//! - The stats line is machine-readable:
//!   `[turn 3: prompt 120 tokens, cached 96, prefill 24 at 310.2 tok/s, reply 24 tokens at 61.0 tok/s, stop length]`

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::generate;
use crate::chat_template::{ChatTemplate, Message, TemplateSource};
use crate::engine::{Engine, EngineError, EngineOptions, FinishReason, Generation, PoolOptions};
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::{StreamDecoder, Tokenizer};

type BoxError = Box<dyn std::error::Error>;

#[derive(Debug, Clone)]
pub struct ReplArgs {
    pub model: PathBuf,
    pub system: Option<String>,
    pub n_predict: usize,
    pub ctx: usize,
    pub cpu: crate::backend::CpuOptions,
    pub device: crate::backend::DeviceOptions,
    pub chat_template: Option<String>,
    pub sampling: SamplingParams,
    pub prefix_cache: bool,
    /// KV pool size in MiB (`--kv-mem`); 0: one context.
    pub kv_mem_mib: usize,
    /// `--kv-budget` / `--kv-policy`: tokens each turn's sequence keeps.
    pub budget: Option<crate::kv::KvBudget>,
}

/// A conversation as `/save` writes it: `{"system": ..., "messages": [{"role", "content"}, ...]}`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    #[serde(default)]
    pub system: Option<String>,
    #[serde(default)]
    pub messages: Vec<Message>,
}

impl Conversation {
    /// What the template sees: the system message (if any) first, then the turns.
    pub fn to_messages(&self) -> Vec<Message> {
        let system = self.system.iter().map(|s| Message::new("system", s));
        system.chain(self.messages.iter().cloned()).collect()
    }
}

/// The token ids of `conv` rendered for the assistant's next reply.
pub fn prompt_ids(tok: &Tokenizer, template: &ChatTemplate, conv: &Conversation) -> Result<Vec<u32>, BoxError> {
    let text = template.render(&conv.to_messages(), true)?;
    // The template may already begin with the BOS text; then do not add a second one (as generate.rs).
    let bos_text = String::from_utf8_lossy(&tok.token_to_piece(tok.bos_id())).into_owned();
    let add_special = !(tok.add_bos() && !bos_text.is_empty() && text.starts_with(&bos_text));
    Ok(tok.encode(&text, add_special, true)?)
}

/// Ctrl-C: during a reply it sets `cancel`; at any other moment outside the line editor (which reads
/// Ctrl-C as a key) it ends the program.
struct Interrupt {
    cancel: Arc<AtomicBool>,
    replying: Arc<AtomicBool>,
}

impl Interrupt {
    fn install() -> Result<Interrupt, BoxError> {
        let (cancel, replying) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let (c, r) = (cancel.clone(), replying.clone());
        ctrlc::set_handler(move || {
            if r.load(Ordering::SeqCst) {
                c.store(true, Ordering::SeqCst);
            } else {
                std::process::exit(130);
            }
        })
        .map_err(|e| format!("cannot install the Ctrl-C handler: {e}"))?;
        Ok(Interrupt { cancel, replying })
    }
}

enum Line {
    Text(String),
    Interrupted,
    Eof,
}

/// Where input lines come from.
enum Input {
    Editor(rustyline::DefaultEditor),
    Plain(std::io::Stdin),
}

impl Input {
    fn read_line(&mut self, prompt: &str) -> Result<Line, BoxError> {
        match self {
            Input::Editor(ed) => match ed.readline(prompt) {
                Ok(s) => Ok(Line::Text(s)),
                Err(rustyline::error::ReadlineError::Interrupted) => Ok(Line::Interrupted),
                Err(rustyline::error::ReadlineError::Eof) => Ok(Line::Eof),
                Err(e) => Err(e.into()),
            },
            Input::Plain(stdin) => {
                let mut s = String::new();
                if stdin.lock().read_line(&mut s)? == 0 {
                    return Ok(Line::Eof);
                }
                let n = s.trim_end_matches(['\n', '\r']).len();
                s.truncate(n);
                Ok(Line::Text(s))
            }
        }
    }

    /// One input: a line, or several joined by `\` continuations or a `"""` block.
    fn read_input(&mut self) -> Result<Line, BoxError> {
        const FENCE: &str = "\"\"\"";
        let first = match self.read_line(">>> ")? {
            Line::Text(s) => s,
            other => return Ok(other),
        };
        if let Some(rest) = first.trim_start().strip_prefix(FENCE) {
            // A block: everything up to a line ending in `"""`.
            if let Some(one_line) = rest.trim_end().strip_suffix(FENCE) {
                return Ok(Line::Text(one_line.to_string()));
            }
            let mut lines = vec![rest.to_string()];
            loop {
                match self.read_line("... ")? {
                    Line::Text(s) => match s.trim_end().strip_suffix(FENCE) {
                        Some(last) => {
                            lines.push(last.to_string());
                            break;
                        }
                        None => lines.push(s),
                    },
                    Line::Interrupted => return Ok(Line::Interrupted),
                    Line::Eof => break,
                }
            }
            let text = lines.join("\n");
            return Ok(Line::Text(text.trim_matches('\n').to_string()));
        }
        let mut text = first;
        while let Some(head) = text.strip_suffix('\\') {
            text = format!("{head}\n");
            match self.read_line("... ")? {
                Line::Text(s) => text.push_str(&s),
                Line::Interrupted => return Ok(Line::Interrupted),
                Line::Eof => break,
            }
        }
        Ok(Line::Text(text))
    }

    fn add_history(&mut self, entry: &str) {
        if let Input::Editor(ed) = self {
            let _ = ed.add_history_entry(entry);
        }
    }
}

const HELP: &str = "\
commands:
  /system TEXT   set the system message (kept at the start); /system alone removes it
  /clear         start a new conversation (the system message and the KV cache stay)
  /stats         KV cache usage and prefix-cache hit rate
  /save FILE     write the conversation as JSON
  /load FILE     read a conversation written by /save
  /help          this list
  /exit          leave (or Ctrl-D)
input: a line ending in \\ continues on the next line; \"\"\" opens and closes a multi-line block;
Ctrl-C stops a reply.";

enum Flow {
    Continue,
    Exit,
}

struct Repl {
    engine: Engine,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    conv: Conversation,
    sampling: SamplingParams,
    n_predict: usize,
    interrupt: Interrupt,
    /// Replies generated so far (numbers the stats lines).
    turns: usize,
    last_prompt_tokens: usize,
}

pub fn run(args: &ReplArgs) -> Result<(), BoxError> {
    let interactive = std::io::stdin().is_terminal();
    let generate::Loaded { model, tokenizer, template, file: _ } =
        generate::load_on(&args.model, args.ctx, args.cpu, args.chat_template.as_deref(), args.device)?;
    if let TemplateSource::BuiltIn(name) = &template.origin {
        eprintln!("note: the model has no chat template; using the built-in '{name}' template (--chat-template FILE to pick another)");
    }
    let ctx = args.ctx.min(model.config().ctx_train.max(1));
    let eog_ids = tokenizer.eog_ids().to_vec();
    let opts = EngineOptions { ctx, prefix_cache: args.prefix_cache, budget: args.budget };
    let pool = PoolOptions { kv_mem_bytes: args.kv_mem_mib << 20, block_size: 0 };
    let engine = Engine::with_pool(model, eog_ids, opts, pool)?;
    let mut repl = Repl {
        engine,
        tokenizer,
        template,
        conv: Conversation { system: args.system.clone(), messages: Vec::new() },
        sampling: args.sampling.clone(),
        n_predict: args.n_predict,
        interrupt: Interrupt::install()?,
        turns: 0,
        last_prompt_tokens: 0,
    };
    let mut input = if interactive {
        let name = args.model.file_name().map_or_else(|| args.model.display().to_string(), |n| n.to_string_lossy().into_owned());
        eprintln!("chatting with {name} (context {ctx} tokens): /help for commands, Ctrl-D or /exit to leave");
        Input::Editor(rustyline::DefaultEditor::new()?)
    } else {
        Input::Plain(std::io::stdin())
    };

    let mut interrupted = false;
    loop {
        let text = match input.read_input()? {
            Line::Eof => break,
            Line::Interrupted if interrupted => break,
            Line::Interrupted => {
                interrupted = true;
                eprintln!("(Ctrl-C again, Ctrl-D or /exit to leave)");
                continue;
            }
            Line::Text(t) => t,
        };
        interrupted = false;
        if text.trim().is_empty() {
            continue;
        }
        input.add_history(&text);
        let step = if text.starts_with('/') { repl.command(&text) } else { repl.turn(text).map(|()| Flow::Continue) };
        match step {
            Ok(Flow::Continue) => {}
            Ok(Flow::Exit) => break,
            Err(e) => eprintln!("error: {e}"),
        }
    }
    Ok(())
}

impl Repl {
    /// One user message: render, generate, stream, record the reply.
    fn turn(&mut self, text: String) -> Result<(), BoxError> {
        self.conv.messages.push(Message::new("user", &text));
        let res = self.reply();
        if res.is_err() {
            self.conv.messages.pop();
        }
        res
    }

    fn reply(&mut self) -> Result<(), BoxError> {
        let ids = prompt_ids(&self.tokenizer, &self.template, &self.conv)?;
        self.last_prompt_tokens = ids.len();
        // A fresh sampler per turn: a conversation replayed (or /load-ed) gives the same replies.
        let mut sampler = Sampler::new(self.sampling.clone());
        let mut decoder = StreamDecoder::new(&self.tokenizer);
        let mut reply = String::new();
        let mut out = std::io::stdout().lock();
        let mut on_token = |id: u32| {
            let piece = decoder.push(id);
            reply.push_str(&piece);
            // A closed stdout (e.g. `| head`) ends the reply.
            write!(out, "{piece}").and_then(|()| out.flush()).is_ok()
        };
        self.interrupt.cancel.store(false, Ordering::SeqCst);
        self.interrupt.replying.store(true, Ordering::SeqCst);
        let res = self.engine.generate(&ids, &mut sampler, self.n_predict, &self.interrupt.cancel, &mut on_token);
        self.interrupt.replying.store(false, Ordering::SeqCst);
        let tail = decoder.flush();
        reply.push_str(&tail);
        let g = match res {
            Ok(g) => g,
            Err(e @ EngineError::PromptTooLong { .. }) => return Err(format!("{e}; or /clear the conversation").into()),
            Err(e) => return Err(e.into()),
        };
        let _ = writeln!(out, "{tail}");
        let _ = out.flush();
        drop(out);
        if g.finish == FinishReason::Cancelled {
            eprintln!("(reply stopped)");
        }
        if g.tokens.is_empty() && g.finish == FinishReason::Cancelled {
            // Stopped before a word was said: forget the question too.
            self.conv.messages.pop();
        } else {
            self.conv.messages.push(Message::new("assistant", &reply));
        }
        self.turns += 1;
        eprintln!("{}", stats_line(self.turns, &g));
        Ok(())
    }

    fn command(&mut self, text: &str) -> Result<Flow, BoxError> {
        let (name, arg) = match text.split_once(char::is_whitespace) {
            Some((n, a)) => (n, a.trim()),
            None => (text, ""),
        };
        match name {
            "/system" if arg.is_empty() => {
                self.conv.system = None;
                eprintln!("(system message removed)");
            }
            "/system" => {
                self.conv.system = Some(arg.to_string());
                eprintln!("(system message set)");
            }
            "/clear" => {
                self.conv.messages.clear();
                eprintln!("(new conversation)");
            }
            "/stats" => eprintln!("{}", self.stats_text()),
            "/save" | "/load" if arg.is_empty() => return Err(format!("{name} needs a file name: {name} FILE").into()),
            "/save" => {
                let json = serde_json::to_string_pretty(&self.conv)?;
                std::fs::write(arg, json + "\n").map_err(|e| format!("cannot write {arg}: {e}"))?;
                eprintln!("(saved {} messages to {arg})", self.conv.messages.len());
            }
            "/load" => {
                let json = std::fs::read_to_string(arg).map_err(|e| format!("cannot read {arg}: {e}"))?;
                let conv: Conversation = serde_json::from_str(&json).map_err(|e| format!("{arg} is not a saved conversation: {e}"))?;
                self.conv = conv;
                eprintln!("(loaded {} messages from {arg})", self.conv.messages.len());
            }
            "/help" | "/?" => eprintln!("{HELP}"),
            "/exit" | "/quit" | "/bye" => return Ok(Flow::Exit),
            _ => eprintln!("unknown command {name}: /help lists the commands"),
        }
        Ok(Flow::Continue)
    }

    fn stats_text(&self) -> String {
        let s = self.engine.stats();
        let rate = if s.queried_tokens == 0 { 0.0 } else { 100.0 * s.hit_tokens as f64 / s.queried_tokens as f64 };
        format!(
            "conversation: {} messages, last prompt {} tokens\n\
             KV pool: {} of {} blocks held ({} tokens each, {:.1} MiB), {} full blocks cached for re-use\n\
             prefix cache: {} of {} prompt tokens re-used (hit rate {rate:.1}%)",
            self.conv.messages.len(),
            self.last_prompt_tokens,
            s.used_blocks,
            s.total_blocks,
            s.block_size,
            self.engine.kv_pool_bytes() as f64 / (1 << 20) as f64,
            s.cached_blocks,
            s.hit_tokens,
            s.queried_tokens,
        ) + &match self.engine.options().budget {
            Some(b) => format!("\nKV budget: {} tokens per sequence ({}), {} tokens evicted so far", b.tokens, b.policy, s.evicted_tokens),
            None => String::new(),
        }
    }
}

/// `[turn 3: prompt 120 tokens, cached 96, prefill 24 at 310.2 tok/s, reply 24 tokens at 61.0 tok/s, stop length]`
fn stats_line(turn: usize, g: &Generation) -> String {
    let prefill = g.prompt_tokens - g.cached_tokens;
    format!(
        "[turn {turn}: prompt {} tokens, cached {}, prefill {prefill} at {:.1} tok/s, reply {} tokens at {:.1} tok/s, stop {}]",
        g.prompt_tokens,
        g.cached_tokens,
        prefill as f64 / g.prefill_secs.max(1e-9),
        g.tokens.len(),
        g.tokens.len() as f64 / g.decode_secs.max(1e-9),
        g.finish.as_str(),
    )
}
