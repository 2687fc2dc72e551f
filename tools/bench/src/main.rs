//! hafen-bench: drives any Matrix homeserver through the standard Client-Server API only, so that
//! Hafen and Synapse are measured alike. Prints a table and writes JSON. Every loop is bounded;
//! point it only at servers on this machine (loopback).

mod api;
mod report;
mod scale;
mod scenarios;
mod state_at;

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "hafen-bench",
    about = "Load tool for Matrix homeservers (Client-Server API only)"
)]
pub struct Args {
    /// Base URL of the homeserver's client API (loopback only).
    #[arg(long, default_value = "http://127.0.0.1:8008")]
    pub base_url: String,
    /// A label for the report (e.g. "hafen", "synapse").
    #[arg(long, default_value = "server")]
    pub label: String,
    /// Registration token for the m.login.registration_token stage; without it, m.login.dummy is used.
    #[arg(long)]
    pub registration_token: Option<String>,
    /// PID of the server process, for RSS and CPU figures from /proc.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Comma-separated scenarios, or "all": register,create_rooms,send_one_room,send_many_rooms,
    /// delivery_latency,initial_sync,join,messages,http_ceiling. "scale" and "state_at" run only
    /// when named.
    #[arg(long, default_value = "all")]
    pub scenarios: String,
    /// Where to write the JSON report.
    #[arg(long, default_value = "bench-result.json")]
    pub out: PathBuf,
    /// Users to register and log in.
    #[arg(long, default_value_t = 100)]
    pub users: usize,
    /// Rooms to create.
    #[arg(long, default_value_t = 100)]
    pub rooms: usize,
    /// Messages per send scenario.
    #[arg(long, default_value_t = 2000)]
    pub messages: usize,
    /// Concurrent senders in the send scenarios.
    #[arg(long, default_value_t = 8)]
    pub senders: usize,
    /// Messages in the delivery-latency scenario (one every 20 ms).
    #[arg(long, default_value_t = 200)]
    pub latency_messages: usize,
    /// Room counts for the initial-sync scenario.
    #[arg(long, default_value = "50,200", value_delimiter = ',')]
    pub sync_rooms: Vec<usize>,
    /// Joiner counts for the join scenario.
    #[arg(long, default_value = "200,1000", value_delimiter = ',')]
    pub joiners: Vec<usize>,
    /// Events to paginate over in the /messages scenario.
    #[arg(long, default_value_t = 2000)]
    pub pagination_events: usize,
    /// Seconds of the HTTP-ceiling scenario.
    #[arg(long, default_value_t = 5)]
    pub ceiling_secs: u64,
    /// Concurrency for register/join setup work.
    #[arg(long, default_value_t = 8)]
    pub setup_concurrency: usize,
    /// Scale scenario: users at full size.
    #[arg(long, default_value_t = 10_000)]
    pub scale_users: usize,
    /// Scale scenario: rooms at full size (the observer user is in all of them).
    #[arg(long, default_value_t = 1_000)]
    pub scale_rooms: usize,
    /// Scale scenario: messages at full size.
    #[arg(long, default_value_t = 1_000_000)]
    pub scale_events: usize,
    /// Scale scenario: members joined to each room besides the observer.
    #[arg(long, default_value_t = 10)]
    pub scale_members: usize,
    /// Scale scenario: the steps, in percent of full size, at which figures are taken.
    #[arg(long, default_value = "10,25,50,100", value_delimiter = ',')]
    pub scale_steps: Vec<usize>,
    /// Scale scenario: send requests in flight while growing.
    #[arg(long, default_value_t = 32)]
    pub scale_concurrency: usize,
    /// State-at scenario: state events in the room (distinct state keys).
    #[arg(long, default_value_t = 10_000)]
    pub state_events: usize,
    /// State-at scenario: distinct state keys the events are spread over (default: all distinct).
    #[arg(long)]
    pub state_keys: Option<usize>,
    /// The server's data directory, for the disk-bytes figures of the scale scenario.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if let Err(e) = check_loopback(&args.base_url) {
        eprintln!("hafen-bench: {e}");
        std::process::exit(2);
    }
    let api = api::Api::new(&args.base_url);
    let run = scenarios::run_all(&args, &api).await;
    print!("{}", report::table(&run));
    match serde_json::to_vec_pretty(&run) {
        Ok(json) => {
            if let Err(e) = std::fs::write(&args.out, json) {
                eprintln!("hafen-bench: cannot write {}: {e}", args.out.display());
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("hafen-bench: {e}");
            std::process::exit(1);
        }
    }
}

/// Load is only ever sent to this machine.
fn check_loopback(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or("base URL must start with http:// or https://")?;
    let host = rest.split(['/', ':']).next().unwrap_or("");
    let host = if rest.starts_with('[') {
        rest.split(']').next().unwrap_or("").trim_start_matches('[')
    } else {
        host
    };
    let ok = host == "localhost"
        || host == "::1"
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "refusing to load {host}: only loopback addresses are allowed"
        ))
    }
}
