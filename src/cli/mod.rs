//! The command line: `pagellm run` (one-shot prompt), `perplexity`, `info`, `synth`.

pub mod bench;
pub mod generate;
pub mod info;
pub mod perplexity;
pub mod repl;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::backend::DeviceChoice;
use crate::gguf::GgufFile;
use crate::sampling::SamplingParams;
use crate::synth;

fn default_threads() -> usize {
    crate::backend::cpu::physical_cores()
}

#[derive(Parser, Debug)]
#[command(name = "pagellm", version, about = "Run quantized LLMs locally from GGUF files", long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Where the model runs (every command that loads a model).
#[derive(Args, Debug, Clone, Copy)]
pub struct DeviceArgs {
    /// Compute device: auto (CUDA when a GPU is usable, else the CPU), cpu or cuda.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// With a GPU: only the last N layers, the final norm and the output projection on the GPU, the
    /// embeddings and the other layers on the CPU (for a model larger than the GPU's memory; llama.cpp's
    /// -ngl). 0: all on the CPU. Default: the whole model on the device --device picks.
    #[arg(long = "gpu-layers", visible_alias = "ngl", value_name = "N")]
    gpu_layers: Option<usize>,
}

impl DeviceArgs {
    fn options(self) -> crate::backend::DeviceOptions {
        crate::backend::DeviceOptions { device: self.device, gpu_layers: self.gpu_layers }
    }
}

/// How the CPU backend runs (every command that loads a model).
#[derive(Args, Debug, Clone, Copy)]
pub struct CpuArgs {
    /// Worker threads (default: one per physical core).
    #[arg(short = 't', long, default_value_t = default_threads())]
    threads: usize,
    /// CPU: read every weight in place from the mapped file. By default the matrices of the types the
    /// kernels repack (Q8_0 on AVX-512) get a packed copy in RAM at their first use, about 6% larger
    /// than in the file, for faster decoding; use this when the model barely fits in memory.
    #[arg(long)]
    no_repack: bool,
    /// CPU float order: `native` (pagellm's SIMD kernels, results independent of batching) or
    /// `llama.cpp` (the operations of llama.cpp's x86 CPU build one by one, for logits equal to its own
    /// bit for bit on Q4_1 / Q5_0 / Q8_0 / Q4_K / Q6_K models; several times slower).
    #[arg(long, default_value = "native")]
    numerics: crate::backend::Numerics,
}

impl CpuArgs {
    fn options(self) -> crate::backend::CpuOptions {
        crate::backend::CpuOptions { threads: self.threads, repack: !self.no_repack, numerics: self.numerics }
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Chat with a model (interactive REPL), or generate from a one-shot prompt with -p (-p - reads stdin).
    Run {
        /// Path to a .gguf file.
        model: PathBuf,
        /// The prompt; "-" reads it from stdin.
        #[arg(short, long)]
        prompt: Option<String>,
        /// A system message (chat mode only).
        #[arg(long)]
        system: Option<String>,
        /// Most tokens to generate.
        #[arg(short = 'n', long = "n-predict", default_value_t = 256)]
        n_predict: usize,
        /// Context size in tokens (prompt + reply); capped by the model's training context.
        #[arg(short = 'c', long, default_value_t = 4096)]
        ctx: usize,
        /// Send the prompt as is, without the chat template.
        #[arg(long)]
        raw: bool,
        /// One-shot: keep generating past end-of-generation tokens until -n (benchmarks).
        #[arg(long)]
        ignore_eos: bool,
        /// A Jinja chat template file that replaces the model's.
        #[arg(long)]
        chat_template: Option<String>,
        #[command(flatten)]
        cpu: CpuArgs,
        #[command(flatten)]
        device: DeviceArgs,
        /// Chat: prefill every turn's whole conversation instead of re-using the cached prefix.
        #[arg(long)]
        no_prefix_cache: bool,
        /// Chat and --serve: KV cache memory in MiB over all layers, K and V; 0: exactly one --ctx
        /// context. More keeps more prefixes (earlier conversations, other clients) cached.
        #[arg(long = "kv-mem", value_name = "MiB", default_value_t = 0)]
        kv_mem: usize,
        #[command(flatten)]
        sampling: SamplingArgs,
        #[command(flatten)]
        budget: KvBudgetArgs,
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// Perplexity of a text file, computed the way llama-perplexity does (second half of each chunk).
    Perplexity {
        /// Path to a .gguf file.
        model: PathBuf,
        /// The text file to score.
        #[arg(short = 'f', long)]
        file: PathBuf,
        /// Tokens per chunk.
        #[arg(short = 'c', long, default_value_t = 512)]
        ctx: usize,
        /// Score at most this many chunks (0: all).
        #[arg(long, default_value_t = 0)]
        chunks: usize,
        #[command(flatten)]
        cpu: CpuArgs,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        device: DeviceArgs,
        #[command(flatten)]
        budget: KvBudgetArgs,
        /// With --kv-budget: tokens fed per step, so eviction happens as it would during generation
        /// (1 is exact decode; larger is faster).
        #[arg(long, default_value_t = 16)]
        kv_step: usize,
    },
    /// Measure prompt processing (pp) and generation (tg) speed, like llama-bench (--parallel: like
    /// llama-batched-bench).
    Bench {
        /// Path to a .gguf file.
        model: PathBuf,
        /// Prompt tokens for the pp test (0: skip it).
        #[arg(short = 'p', long = "n-prompt", default_value_t = 512)]
        n_prompt: usize,
        /// Generated tokens for the tg test (0: skip it).
        #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
        n_gen: usize,
        /// Tokens already in the cache when each test starts (llama-bench's -d).
        #[arg(short = 'd', long = "n-depth", default_value_t = 0)]
        depth: usize,
        /// Timed repetitions of each test (after one warm-up run).
        #[arg(short = 'r', long, default_value_t = 3)]
        reps: usize,
        #[command(flatten)]
        cpu: CpuArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        device: DeviceArgs,
        /// Sequences decoded side by side, like llama-batched-bench: N distinct prompts of -p tokens are
        /// prefilled together (pp: N*p tokens/s), then each of -n steps runs one token of every sequence
        /// in one batch (tg: N*n tokens/s). 1: a single sequence, as above.
        #[arg(short = 'P', long, value_name = "N", default_value_t = 1)]
        parallel: usize,
    },
    /// Describe a GGUF model: architecture, shape, tokenizer, tensor types and sizes.
    Info {
        /// Path to a .gguf file.
        model: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Also list every metadata key (arrays shown by type and length).
        #[arg(long)]
        metadata: bool,
    },
    /// Write a GGUF with random weights for a named shape (benchmarks and tests; no download needed).
    Synth {
        /// Shape: tiny, tiny-gemma3, smollm2-135m, gemma3-270m, llama3-1b, llama3-8b.
        #[arg(long, default_value = "tiny")]
        shape: String,
        /// Weight type: f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k, or
        /// the mix q4_k_m. Rows too short for a K-quant fall back like llama.cpp (e.g. Q4_K -> Q5_0).
        #[arg(long = "type", default_value = "q4_0")]
        ty: String,
        /// Random seed: the same seed writes the same file.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Output path.
        #[arg(short, long)]
        output: PathBuf,
    },
}

/// `--serve` and its flags: an OpenAI-compatible HTTP server instead of the REPL.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Serve the model over HTTP (OpenAI-compatible /v1/chat/completions, /v1/completions, /v1/models).
    #[arg(long)]
    pub serve: bool,
    /// Address to listen on (loopback by default; 0.0.0.0 exposes the server to the network).
    #[arg(long, default_value = "127.0.0.1", requires = "serve")]
    pub host: String,
    /// Port to listen on (0: any free port; the one bound is printed).
    #[arg(long, default_value_t = 8080, requires = "serve")]
    pub port: u16,
    /// The model id clients see (default: the file name without .gguf).
    #[arg(long, requires = "serve")]
    pub alias: Option<String>,
    /// Require `Authorization: Bearer KEY` on every endpoint.
    #[arg(long, requires = "serve")]
    pub api_key: Option<String>,
    /// Most requests waiting for the engine; past it the server answers 429.
    #[arg(long, default_value_t = 64, requires = "serve")]
    pub max_queue: usize,
    /// Most requests batched together (continuous batching); more wait in the queue.
    #[arg(long, default_value_t = 64, requires = "serve")]
    pub parallel: usize,
}

/// KV budget flags: bounded KV memory per sequence for long generations and chats (kv/budget.rs).
#[derive(clap::Args, Debug, Clone)]
pub struct KvBudgetArgs {
    /// Most tokens a sequence keeps in the KV cache (0: keep all). Past it, --kv-policy evicts.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub kv_budget: usize,
    /// What --kv-budget evicts: h2o (keep the most recent and the heaviest-attended tokens), sinks
    /// (StreamingLLM: keep the first --kv-sinks tokens and the most recent), or none.
    #[arg(long, default_value = "h2o")]
    pub kv_policy: crate::kv::KvPolicy,
    /// sinks: tokens kept from the start.
    #[arg(long, default_value_t = crate::kv::DEFAULT_SINKS)]
    pub kv_sinks: usize,
    /// h2o: fraction of the budget kept for the most recent tokens (the rest: heavy hitters).
    #[arg(long, default_value_t = crate::kv::DEFAULT_RECENT)]
    pub h2o_recent: f32,
}

impl KvBudgetArgs {
    /// The budget the flags ask for; `None` without --kv-budget or with policy none.
    pub fn budget(&self) -> Option<crate::kv::KvBudget> {
        use crate::kv::KvPolicy;
        let policy = match self.kv_policy {
            KvPolicy::Sinks { .. } => KvPolicy::Sinks { sinks: self.kv_sinks },
            KvPolicy::H2o { .. } => KvPolicy::H2o { recent: self.h2o_recent },
            KvPolicy::None => KvPolicy::None,
        };
        (self.kv_budget > 0).then_some(crate::kv::KvBudget { tokens: self.kv_budget, policy }).and_then(crate::kv::KvBudget::active)
    }
}

/// Sampling flags; the defaults are llama.cpp's.
#[derive(clap::Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Temperature; 0 picks the most likely token every step (greedy).
    #[arg(long, default_value_t = 0.8)]
    pub temp: f32,
    /// Sample only among the k most likely tokens (0: off).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Sample only among the most likely tokens whose probabilities add up to p (1: off).
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Drop tokens less likely than min-p times the most likely one (0: off).
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// Penalise tokens seen in the last --repeat-last-n tokens (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// How many recent tokens the penalties consider.
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    /// Subtracted from the logit of any token already present.
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    /// Subtracted per earlier occurrence of a token.
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    /// Random seed: the same seed and settings give the same output.
    #[arg(long, default_value_t = 0xC0FFEE)]
    pub seed: u64,
}

impl SamplingArgs {
    pub fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
        }
    }
}

/// Entry point for the binary: parse arguments, run, print errors as one line.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    match cli.command {
        Command::Run { model, prompt, system, n_predict, ctx, raw, ignore_eos, chat_template, cpu, device, no_prefix_cache, kv_mem, sampling, budget, serve } => {
            let budget = budget.budget();
            if serve.serve {
                if prompt.is_some() || system.is_some() || raw {
                    return Err("--serve takes no -p, --system or --raw: clients send the conversation".into());
                }
                let lm = generate::load_on(&model, ctx, cpu.options(), chat_template.as_deref(), device.options())?;
                if let crate::chat_template::TemplateSource::BuiltIn(name) = &lm.template.origin {
                    eprintln!("note: the model has no chat template; using the built-in '{name}' template (--chat-template FILE to pick another)");
                }
                let stem = model.file_stem().map_or_else(|| model.display().to_string(), |s| s.to_string_lossy().into_owned());
                let ctx = ctx.min(lm.model.config().ctx_train.max(1));
                let eog_ids = lm.tokenizer.eog_ids().to_vec();
                let engine_opts = crate::engine::EngineOptions { ctx, prefix_cache: !no_prefix_cache, budget };
                let pool = crate::engine::PoolOptions { kv_mem_bytes: kv_mem << 20, block_size: 0 };
                let engine = crate::engine::Engine::with_pool(lm.model, eog_ids, engine_opts, pool)?;
                let opts = crate::server::ServeOptions {
                    host: serve.host,
                    port: serve.port,
                    model_id: serve.alias.unwrap_or(stem),
                    api_key: serve.api_key,
                    max_queue: serve.max_queue,
                    max_running: serve.parallel.max(1),
                    ctx,
                    defaults: sampling.params(),
                };
                return crate::server::serve(engine, lm.tokenizer, lm.template, opts);
            }
            let Some(prompt) = prompt else {
                if raw {
                    return Err("--raw needs a prompt (-p); the chat REPL always uses the chat template".into());
                }
                let args = repl::ReplArgs {
                    model,
                    system,
                    n_predict,
                    ctx,
                    cpu: cpu.options(),
                    device: device.options(),
                    chat_template,
                    sampling: sampling.params(),
                    prefix_cache: !no_prefix_cache,
                    kv_mem_mib: kv_mem,
                    budget,
                };
                return repl::run(&args);
            };
            let args = generate::GenerateArgs {
                model,
                prompt: generate::resolve_prompt(&prompt)?,
                system,
                n_predict,
                ctx,
                cpu: cpu.options(),
                device: device.options(),
                raw,
                chat_template,
                sampling: sampling.params(),
                budget,
                ignore_eos,
            };
            generate::run(&args)
        }
        Command::Perplexity { model, file, ctx, chunks, cpu, json, device, budget, kv_step } => {
            let text = std::fs::read_to_string(&file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            let lm = generate::load_on(&model, ctx, cpu.options(), None, device.options())?;
            let t = std::time::Instant::now();
            let progress = |i: usize, p: f64| {
                if !json {
                    eprint!("[{}]{p:.4},", i + 1);
                }
            };
            let res = match budget.budget() {
                None => perplexity::evaluate(&lm.model, &lm.tokenizer, &text, ctx, chunks, progress)?,
                Some(b) => {
                    let opts = crate::engine::EngineOptions { ctx, prefix_cache: false, budget: Some(b) };
                    let mut engine = crate::engine::Engine::new(lm.model, lm.tokenizer.eog_ids().to_vec(), opts)?;
                    perplexity::evaluate_budget(&mut engine, &lm.tokenizer, &text, ctx, chunks, kv_step.max(1), progress)?
                }
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&res)?);
            } else {
                eprintln!();
                println!("Final estimate: PPL = {:.4} +/- {:.5}", res.ppl, res.ppl_err);
                eprintln!(
                    "{} tokens, {} chunks of {ctx}, {} scored, {:.1} s ({:.1} tok/s)",
                    res.n_tokens,
                    res.n_chunks,
                    res.scored,
                    t.elapsed().as_secs_f64(),
                    (res.n_chunks * ctx) as f64 / t.elapsed().as_secs_f64()
                );
            }
            Ok(())
        }
        Command::Bench { model, n_prompt, n_gen, depth, reps, cpu, json, device, parallel } => {
            let threads = cpu.threads;
            if parallel == 0 {
                return Err("--parallel must be at least 1".into());
            }
            if parallel > 1 && (depth > 0 || n_prompt == 0) {
                return Err("--parallel needs -p of 1 or more and takes no -d: every sequence starts from its own prompt on an empty cache".into());
            }
            let file = std::sync::Arc::new(GgufFile::open(&model)?);
            let backend = generate::backend_for(&file, cpu.options(), device.options())?;
            let rows = if parallel == 1 {
                let ctx = depth + n_prompt.max(n_gen).max(1);
                let m = crate::model::Model::load_on(file, crate::model::ModelOptions { ctx, threads }, backend)?;
                bench::run(&m, n_prompt, n_gen, depth, reps.max(1), threads)?
            } else {
                // Each sequence holds its prompt and the n_gen tokens run after it.
                let seq_tokens = n_prompt.saturating_add(n_gen.max(1));
                let m = crate::model::Model::load_on(file.clone(), crate::model::ModelOptions { ctx: seq_tokens, threads }, backend)?;
                // The pool first: it refuses sizes whose prompts would not fit in memory either.
                let mut engine = bench::parallel_engine(m, parallel, seq_tokens)?;
                let prompts = bench::parallel_prompts(parallel, n_prompt, &bench::plain_ids(&file, engine.model().config().n_vocab));
                bench::run_parallel(&mut engine, &prompts, n_gen, reps.max(1), threads)?
            };
            let name = model.file_name().map_or_else(|| model.display().to_string(), |n| n.to_string_lossy().into_owned());
            if json {
                println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "model": name, "results": rows }))?);
            } else {
                print!("{}", bench::render(&name, &rows));
            }
            Ok(())
        }
        Command::Info { model, json, metadata } => {
            let f = GgufFile::open(&model)?;
            let info = info::ModelInfo::from_file(&model, &f);
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print!("{}", info.render());
                if metadata {
                    println!("\nmetadata ({} keys)", f.metadata.len());
                    for (k, v) in &f.metadata {
                        println!("  {k:<44} {v}");
                    }
                }
            }
            Ok(())
        }
        Command::Synth { shape, ty, seed, output } => {
            let names: Vec<&str> = synth::SHAPES.iter().map(|s| s.name).collect();
            let sh = synth::shape(&shape).ok_or_else(|| format!("unknown shape '{shape}'; known: {}", names.join(", ")))?;
            let recipe = synth::Recipe::parse(&ty).ok_or_else(|| {
                format!("unknown or unsupported weight type '{ty}'; use f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k or q4_k_m")
            })?;
            let bar = progress_bar(synth::tensor_specs(sh, recipe).len() as u64, "writing tensors");
            let bytes = synth::write_model(&output, sh, recipe, seed, |i, _| bar.set_position(i as u64))?;
            bar.finish_and_clear();
            eprintln!("wrote {} ({}, shape {}, {ty})", output.display(), info::human_bytes(bytes), sh.name);
            Ok(())
        }
    }
}

/// A progress bar on a terminal; hidden when stderr is not one (pipes, CI logs).
pub fn progress_bar(len: u64, msg: &'static str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ({eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(msg);
    bar
}
