//! The version string: the crate version, plus the commit when the build environment names it
//! (`HAFEN_GIT_COMMIT=$(git rev-parse --short HEAD) cargo build --release`). Git is never run
//! here, so builds from a source archive work the same.
fn main() {
    println!("cargo:rerun-if-env-changed=HAFEN_GIT_COMMIT");
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    let full = match std::env::var("HAFEN_GIT_COMMIT") {
        Ok(commit) if !commit.trim().is_empty() => format!("{version} ({})", commit.trim()),
        _ => version,
    };
    println!("cargo:rustc-env=HAFEN_VERSION={full}");
}
