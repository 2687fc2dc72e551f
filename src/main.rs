//! The `hafen` command: serve, and the admin commands that work on the database directly.

use std::{io::Read, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use hafen::{config, service::Services, storage::Storage};

#[derive(Parser)]
#[command(
    name = "hafen",
    version = hafen::VERSION,
    about = "A Matrix homeserver for organizations"
)]
struct Cli {
    /// Config file (default: ./conduit-config.toml; env HAFEN_CONFIG).
    #[arg(long, global = true, env = "HAFEN_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the homeserver (the default).
    Serve,
    /// Manage users.
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Manage registration tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Check the config and the database against REQUIREMENTS.md, row by row (run while the
    /// server is stopped). Exit 0 when every row is met, 1 when one falls short, 2 on errors.
    Audit {
        /// Print the report as JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Manage the server's signing key (run while the server is stopped).
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Media store maintenance (run while the server is stopped).
    Media {
        #[command(subcommand)]
        command: MediaCommand,
    },
    /// Backups.
    Backup {
        #[command(subcommand)]
        command: BackupCommand,
    },
}

#[derive(Subcommand)]
enum MediaCommand {
    /// Rewrite every media file stored in plain text encrypted with media_encryption_key_file.
    /// Interruptible: run it again to finish.
    Encrypt,
}

#[derive(Subcommand)]
enum BackupCommand {
    /// Decrypt an encrypted backup (`hafen-<ms>.tar.enc`) into TARGET (new or empty), as
    /// TARGET/db and TARGET/media: start a server with database_path and media_path there.
    /// The key is the config's backup_encryption_key_file (else media_encryption_key_file).
    Restore { archive: PathBuf, target: PathBuf },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Make a new signing key; the current one stays published as an old key.
    Rotate,
}

#[derive(Subcommand)]
enum UserCommand {
    /// Create a user. The password comes from --password-file, or stdin when it is not a
    /// terminal, or an interactive prompt.
    Create {
        name: String,
        #[arg(long)]
        admin: bool,
        #[arg(long)]
        password_file: Option<PathBuf>,
    },
    /// Set a new password for a user.
    ResetPassword {
        name: String,
        #[arg(long)]
        password_file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a registration token and print it.
    Create {
        /// How many registrations it allows (default: unlimited).
        #[arg(long)]
        uses: Option<u32>,
        /// When it expires: seconds from now, or with a unit suffix (e.g. 30m, 12h, 7d).
        #[arg(long)]
        expires: Option<String>,
        /// Use this token text instead of a random one.
        #[arg(long)]
        token: Option<String>,
    },
    /// List registration tokens.
    List,
}

/// glibc's malloc raises its mmap threshold after freeing a large block, and from then on keeps
/// such blocks (argon2's 19 MiB, large JSON bodies) in its heaps for good. A fixed threshold makes
/// every large allocation an mmap that is returned to the system when freed, and fewer arenas
/// keep fewer half-empty heaps: a much smaller resident set for the same work.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    extern "C" {
        fn mallopt(param: i32, value: i32) -> i32;
    }
    const M_MMAP_THRESHOLD: i32 = -3;
    const M_ARENA_MAX: i32 = -8;
    // SAFETY: mallopt only changes allocator parameters; called before any thread starts.
    unsafe {
        mallopt(M_MMAP_THRESHOLD, 256 * 1024);
        mallopt(M_ARENA_MAX, 4);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}

/// How often freed heap memory is handed back to the system.
const TRIM_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// Freed memory in the middle of glibc's heaps stays resident until `malloc_trim` releases it;
/// after a burst (a large initial sync, many registrations) that is tens of MiB. Trimming every
/// half minute costs a few milliseconds of one blocking thread.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
async fn trim_allocator_periodically() {
    extern "C" {
        fn malloc_trim(pad: usize) -> i32;
    }
    let mut tick = tokio::time::interval(TRIM_INTERVAL);
    loop {
        tick.tick().await;
        // SAFETY: malloc_trim only returns free memory to the system; it is thread-safe.
        let _ = tokio::task::spawn_blocking(|| unsafe { malloc_trim(0) }).await;
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
async fn trim_allocator_periodically() {}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    let loaded = match config::load(cli.config.as_deref(), std::env::vars()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("hafen: {e}");
            return ExitCode::from(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&loaded.config.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    for w in &loaded.warnings {
        tracing::warn!("{w}");
    }
    let config = loaded.config;
    let command = cli.command.unwrap_or(Command::Serve);
    if let Command::Audit { json } = command {
        return audit(config, json);
    }
    let result = match command {
        Command::Serve => serve(config),
        Command::User { command } => user_command(config, command),
        Command::Token { command } => token_command(config, command),
        Command::Key {
            command: KeyCommand::Rotate,
        } => rotate_key(config),
        Command::Media {
            command: MediaCommand::Encrypt,
        } => encrypt_media(config),
        Command::Backup {
            command: BackupCommand::Restore { archive, target },
        } => restore_backup(config, &archive, &target),
        Command::Audit { .. } => Ok(()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hafen: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: config::Config) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async move {
        let running = hafen::server::start(config).await?;
        tracing::info!(addr = %running.addr, "Hafen is listening");
        let trimmer = tokio::spawn(trim_allocator_periodically());
        shutdown_signal().await;
        trimmer.abort();
        tracing::info!("shutting down");
        running.stop().await
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Open the database for an admin command (refused while a server holds it), at the schema
/// version of this build (a newer one is refused, an older one backed up and migrated).
fn open_storage(config: &config::Config) -> Result<Storage, String> {
    let storage = Storage::open(&config.database_path, 8, true).map_err(|e| e.to_string())?;
    hafen::storage::schema::prepare(
        &storage,
        &config.database_path,
        config.backup_path.as_deref(),
    )?;
    Ok(storage)
}

fn rotate_key(config: config::Config) -> Result<(), String> {
    let storage = open_storage(&config)?;
    let key_id =
        hafen::service::globals::SigningKey::rotate(&storage).map_err(|e| e.to_string())?;
    println!("new signing key {key_id}; the previous one is published as an old key");
    Ok(())
}

/// `hafen audit`: the compliance report from the config and the database.
fn audit(config: config::Config, json: bool) -> ExitCode {
    let (code, text) = hafen::policy::report::run_audit(&config, json);
    if code == 2 {
        eprint!("{text}");
    } else {
        print!("{text}");
    }
    ExitCode::from(code)
}

/// Open the database for an admin command; refuses while a server holds it.
fn open_services(config: config::Config) -> Result<std::sync::Arc<Services>, String> {
    let storage = open_storage(&config)?;
    Services::build(config, storage).map_err(|e| e.to_string())
}

/// `hafen media encrypt`.
fn encrypt_media(config: config::Config) -> Result<(), String> {
    let report = hafen::service::media::encrypt_store(&config)?;
    println!(
        "encrypted {} media files in {}{}",
        report.converted,
        config.media_dir().display(),
        if report.mismatched > 0 {
            format!(
                "; {} files do not match their name and were left as they are (see the log)",
                report.mismatched
            )
        } else {
            String::new()
        }
    );
    Ok(())
}

/// `hafen backup restore ARCHIVE TARGET`.
fn restore_backup(
    config: config::Config,
    archive: &std::path::Path,
    target: &std::path::Path,
) -> Result<(), String> {
    hafen::service::backup::restore(&config, archive, target)?;
    println!(
        "restored into {}: start Hafen with database_path = \"{}\" and media_path = \"{}\"",
        target.display(),
        target.join("db").display(),
        target.join("media").display()
    );
    Ok(())
}

fn read_password(file: Option<PathBuf>) -> Result<String, String> {
    use std::io::IsTerminal;
    let password = if let Some(path) = file {
        std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?
    } else if !std::io::stdin().is_terminal() {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| e.to_string())?;
        s
    } else {
        let first = rpassword::prompt_password("Password: ").map_err(|e| e.to_string())?;
        let second = rpassword::prompt_password("Repeat password: ").map_err(|e| e.to_string())?;
        if first != second {
            return Err("passwords do not match".into());
        }
        first
    };
    let password = password.trim_end_matches(['\n', '\r']).to_owned();
    if password.is_empty() {
        return Err("the password must not be empty".into());
    }
    Ok(password)
}

fn user_command(config: config::Config, command: UserCommand) -> Result<(), String> {
    match command {
        UserCommand::Create {
            name,
            admin,
            password_file,
        } => {
            let password = read_password(password_file)?;
            let services = open_services(config)?;
            let localpart = name
                .trim_start_matches('@')
                .split(':')
                .next()
                .unwrap_or("")
                .to_owned();
            let user_id = services
                .accounts
                .validate_new_localpart(&localpart)
                .map_err(|e| e.to_string())?;
            services
                .accounts
                .create_user(&user_id, Some(&password), admin, false)
                .map_err(|e| e.to_string())?;
            hafen::service::profile_defaults(&services, &user_id).map_err(|e| e.to_string())?;
            println!("created {user_id}{}", if admin { " (admin)" } else { "" });
            Ok(())
        }
        UserCommand::ResetPassword {
            name,
            password_file,
        } => {
            let password = read_password(password_file)?;
            let services = open_services(config)?;
            let user_id = services
                .accounts
                .local_user_id(&name)
                .map_err(|e| e.to_string())?;
            services
                .accounts
                .set_password(&user_id, &password)
                .map_err(|e| e.to_string())?;
            services
                .accounts
                .remove_all_devices(&user_id, None)
                .map_err(|e| e.to_string())?;
            println!("password of {user_id} reset; all its devices were logged out");
            Ok(())
        }
    }
}

fn parse_expiry(text: &str) -> Result<u64, String> {
    let (num, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid --expires `{text}`"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => {
            return Err(format!(
                "invalid --expires unit in `{text}` (use s, m, h or d)"
            ))
        }
    };
    Ok(hafen::utils::now_ms() + secs * 1000)
}

fn token_command(config: config::Config, command: TokenCommand) -> Result<(), String> {
    match command {
        TokenCommand::Create {
            uses,
            expires,
            token,
        } => {
            let expiry = expires.as_deref().map(parse_expiry).transpose()?;
            let services = open_services(config)?;
            let t = services
                .accounts
                .create_registration_token(token, uses, expiry)
                .map_err(|e| e.to_string())?;
            println!("{}", t.token);
            Ok(())
        }
        TokenCommand::List => {
            let services = open_services(config)?;
            for t in services
                .accounts
                .registration_tokens()
                .map_err(|e| e.to_string())?
            {
                println!(
                    "{}\tuses_allowed={}\tcompleted={}\texpiry_ms={}",
                    t.token,
                    t.uses_allowed
                        .map(|n| n.to_string())
                        .unwrap_or_else(|| "unlimited".into()),
                    t.completed,
                    t.expiry_time
                        .map(|n| n.to_string())
                        .unwrap_or_else(|| "never".into()),
                );
            }
            Ok(())
        }
    }
}
