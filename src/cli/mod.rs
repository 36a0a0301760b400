//! The command line: `pagellm run` (one-shot prompt), `perplexity`, `info`, `synth`.

pub mod bench;
pub mod generate;
pub mod info;
pub mod perplexity;
pub mod repl;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::gguf::GgufFile;
use crate::sampling::SamplingParams;
use crate::synth;

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[derive(Parser, Debug)]
#[command(name = "pagellm", version, about = "Run quantized LLMs locally from GGUF files", long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
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
        /// A Jinja chat template file that replaces the model's.
        #[arg(long)]
        chat_template: Option<String>,
        /// Worker threads (default: all cores).
        #[arg(short = 't', long, default_value_t = default_threads())]
        threads: usize,
        /// Chat: prefill every turn's whole conversation instead of re-using the cached prefix.
        #[arg(long)]
        no_prefix_cache: bool,
        #[command(flatten)]
        sampling: SamplingArgs,
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
        /// Worker threads (default: all cores).
        #[arg(short = 't', long, default_value_t = default_threads())]
        threads: usize,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Measure prompt processing (pp) and generation (tg) speed, like llama-bench.
    Bench {
        /// Path to a .gguf file.
        model: PathBuf,
        /// Prompt tokens for the pp test (0: skip it).
        #[arg(short = 'p', long = "n-prompt", default_value_t = 512)]
        n_prompt: usize,
        /// Generated tokens for the tg test (0: skip it).
        #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
        n_gen: usize,
        /// Timed repetitions of each test (after one warm-up run).
        #[arg(short = 'r', long, default_value_t = 3)]
        reps: usize,
        /// Worker threads (default: all cores).
        #[arg(short = 't', long, default_value_t = default_threads())]
        threads: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
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
        Command::Run { model, prompt, system, n_predict, ctx, raw, chat_template, threads, no_prefix_cache, sampling } => {
            let Some(prompt) = prompt else {
                if raw {
                    return Err("--raw needs a prompt (-p); the chat REPL always uses the chat template".into());
                }
                let args = repl::ReplArgs {
                    model,
                    system,
                    n_predict,
                    ctx,
                    threads,
                    chat_template,
                    sampling: sampling.params(),
                    prefix_cache: !no_prefix_cache,
                };
                return repl::run(&args);
            };
            let args = generate::GenerateArgs {
                model,
                prompt: generate::resolve_prompt(&prompt)?,
                system,
                n_predict,
                ctx,
                threads,
                raw,
                chat_template,
                sampling: sampling.params(),
            };
            generate::run(&args)
        }
        Command::Perplexity { model, file, ctx, chunks, threads, json } => {
            let text = std::fs::read_to_string(&file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            let lm = generate::load(&model, ctx, threads, None)?;
            let t = std::time::Instant::now();
            let res = perplexity::evaluate(&lm.model, &lm.tokenizer, &text, ctx, chunks, |i, p| {
                if !json {
                    eprint!("[{}]{p:.4},", i + 1);
                }
            })?;
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
        Command::Bench { model, n_prompt, n_gen, reps, threads, json } => {
            let file = std::sync::Arc::new(GgufFile::open(&model)?);
            let ctx = n_prompt.max(n_gen).max(1);
            let m = crate::model::Model::load(file, crate::model::ModelOptions { ctx, threads })?;
            let rows = bench::run(&m, n_prompt, n_gen, reps.max(1), threads)?;
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
