//! Fails early, with a clear message, when bpf-linker is not installed
//! (`cargo xtask setup` installs it).
use which::which;

fn main() {
    let bpf_linker =
        which("bpf-linker").expect("bpf-linker not found in PATH; run `cargo xtask setup`");
    println!("cargo:rerun-if-changed={}", bpf_linker.to_string_lossy());
}
