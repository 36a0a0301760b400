//! One-shot generation (`pagellm run MODEL -p PROMPT`): load, render the prompt with the chat template
//! (unless `--raw`), prefill, then sample and stream tokens to stdout; timings go to stderr.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use crate::backend::{CpuOptions, DeviceChoice, DeviceOptions};
use crate::chat_template::{ChatTemplate, Message, TemplateSource};
use crate::gguf::{keys, GgufFile};
use crate::engine::{Engine, EngineOptions, FinishReason};
use crate::model::{Model, ModelOptions};
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::{StreamDecoder, Tokenizer};

type BoxError = Box<dyn std::error::Error>;

/// A loaded model with its tokenizer and chat template.
pub struct Loaded {
    pub file: Arc<GgufFile>,
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
}

/// Open the file, read every weight page once behind a progress bar (so the first reply does not pay
/// for page faults), and build model, tokenizer and template.
pub fn load(path: &Path, ctx: usize, threads: usize, template_file: Option<&str>) -> Result<Loaded, BoxError> {
    let device = DeviceOptions { device: DeviceChoice::Cpu, gpu_layers: None };
    load_on(path, ctx, CpuOptions::threads(threads), template_file, device)
}

/// The backend for `file`'s model that `--device` and `--gpu-layers` ask for.
pub fn backend_for(file: &GgufFile, cpu: CpuOptions, device: DeviceOptions) -> Result<Arc<dyn crate::backend::Backend>, BoxError> {
    let n_layers = crate::model::Config::from_gguf(file)?.n_layers;
    let tied = file.tensor("output.weight").is_none();
    let backend = crate::backend::select_for(device, cpu, n_layers, tied)?;
    if cpu.numerics != crate::backend::Numerics::Native && backend.name().contains("cuda") {
        eprintln!("note: --numerics applies to the CPU backend only; the GPU ({}) computes in its own order", backend.name());
    }
    Ok(backend)
}

/// [`load`] on the backend `device` picks (`--device`, `--gpu-layers`).
pub fn load_on(path: &Path, ctx: usize, cpu: CpuOptions, template_file: Option<&str>, device: DeviceOptions) -> Result<Loaded, BoxError> {
    let file = Arc::new(GgufFile::open(path)?);
    warm_pages(&file);
    let tokenizer = Tokenizer::from_gguf(&file)?;
    let model = Model::load_on(file.clone(), ModelOptions { ctx, threads: cpu.threads }, backend_for(&file, cpu, device)?)?;
    let piece = |id: u32| String::from_utf8_lossy(&tokenizer.token_to_piece(id)).into_owned();
    let (bos, eos) = (piece(tokenizer.bos_id()), piece(tokenizer.eos_id()));
    let template = match template_file {
        Some(p) => ChatTemplate::from_file(p, &bos, &eos).map_err(|e| format!("cannot read --chat-template {p}: {e}"))?,
        None => {
            let arch = file.architecture().unwrap_or("");
            let has = |t: &str| tokenizer.encode(t, false, true).map(|ids| ids.len() == 1).unwrap_or(false);
            ChatTemplate::for_model(file.get_str(keys::CHAT_TEMPLATE), arch, has, &bos, &eos)
        }
    };
    Ok(Loaded { file, model, tokenizer, template })
}

fn warm_pages(file: &GgufFile) {
    let bytes = file.bytes();
    const STEP: usize = 4096;
    const CHUNK: usize = 8 << 20;
    let bar = super::progress_bar(bytes.len().div_ceil(CHUNK) as u64, "loading");
    let mut sink = 0u8;
    for (i, chunk) in bytes.chunks(CHUNK).enumerate() {
        for b in chunk.iter().step_by(STEP) {
            sink ^= *b;
        }
        bar.set_position(i as u64 + 1);
    }
    std::hint::black_box(sink);
    bar.finish_and_clear();
}

#[derive(Debug, Clone)]
pub struct GenerateArgs {
    pub model: PathBuf,
    pub prompt: String,
    pub system: Option<String>,
    pub n_predict: usize,
    pub ctx: usize,
    pub cpu: CpuOptions,
    pub device: DeviceOptions,
    pub raw: bool,
    pub chat_template: Option<String>,
    pub sampling: SamplingParams,
    /// `--kv-budget` / `--kv-policy`: bounded KV memory for a long generation.
    pub budget: Option<crate::kv::KvBudget>,
    /// Generate past end-of-generation tokens (`--ignore-eos`).
    pub ignore_eos: bool,
}

/// Read `-p -` from stdin.
pub fn resolve_prompt(p: &str) -> Result<String, BoxError> {
    if p != "-" {
        return Ok(p.to_string());
    }
    let mut s = String::new();
    std::io::stdin().read_to_string(&mut s)?;
    Ok(s)
}

pub fn run(args: &GenerateArgs) -> Result<(), BoxError> {
    let t_load = Instant::now();
    let lm = load_on(&args.model, args.ctx, args.cpu, args.chat_template.as_deref(), args.device)?;
    let tok = &lm.tokenizer;
    let ids = if args.raw {
        tok.encode(&args.prompt, true, false)?
    } else {
        if let TemplateSource::BuiltIn(name) = &lm.template.origin {
            eprintln!("note: the model has no chat template; using the built-in '{name}' template (--raw to send the prompt as is)");
        }
        let mut msgs = Vec::new();
        if let Some(s) = &args.system {
            msgs.push(Message::new("system", s));
        }
        msgs.push(Message::new("user", &args.prompt));
        let text = lm.template.render(&msgs, true)?;
        // The template may already begin with the BOS text; then do not add a second one.
        let bos_text = String::from_utf8_lossy(&tok.token_to_piece(tok.bos_id())).into_owned();
        let add_special = !(tok.add_bos() && !bos_text.is_empty() && text.starts_with(&bos_text));
        tok.encode(&text, add_special, true)?
    };
    let capacity = args.ctx.min(lm.model.config().ctx_train.max(1));
    if ids.len() >= capacity {
        return Err(format!(
            "the prompt is {} tokens, which does not fit the context of {capacity} tokens: pass a larger --ctx (the model was trained on {}) or a shorter prompt",
            ids.len(),
            lm.model.config().ctx_train
        )
        .into());
    }
    let load_s = t_load.elapsed().as_secs_f64();

    let eog_ids = if args.ignore_eos { Vec::new() } else { tok.eog_ids().to_vec() };
    let opts = EngineOptions { ctx: capacity, prefix_cache: false, budget: args.budget };
    let mut engine = Engine::new(lm.model, eog_ids, opts)?;
    let mut sampler = Sampler::new(args.sampling.clone());
    let mut out = std::io::stdout().lock();
    let mut decoder = StreamDecoder::new(tok);
    let mut write_err = None;
    let g = engine.generate(&ids, &mut sampler, args.n_predict, &AtomicBool::new(false), &mut |next| {
        let res = write!(out, "{}", decoder.push(next)).and_then(|_| out.flush());
        write_err = res.err();
        write_err.is_none()
    })?;
    if let Some(e) = write_err {
        return Err(e.into());
    }
    writeln!(out, "{}", decoder.flush())?;
    let stop = match g.finish {
        FinishReason::Stop => "end of generation",
        FinishReason::Length => "length",
        FinishReason::ContextFull => "context full",
        FinishReason::Cancelled => "cancelled",
    };
    let evicted = match args.budget {
        Some(b) => format!(" | kv budget {} ({}), {} tokens evicted", b.tokens, b.policy, engine.stats().evicted_tokens),
        None => String::new(),
    };
    eprintln!(
        "\n[load {load_s:.2} s | prompt {} tokens, {:.1} tok/s | generation {} tokens, {:.1} tok/s | stop: {stop}{evicted}]",
        ids.len(),
        ids.len() as f64 / g.prefill_secs.max(1e-9),
        g.tokens.len(),
        g.tokens.len() as f64 / g.decode_secs.max(1e-9),
    );
    Ok(())
}
