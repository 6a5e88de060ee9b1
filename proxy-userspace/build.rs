//! Builds `proxy-ebpf` for the BPF target (with the nightly toolchain and
//! bpf-linker) and leaves the object in OUT_DIR for `include_bytes_aligned!`.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir)
        .join("../proxy-ebpf")
        .canonicalize()
        .context("proxy-ebpf directory")?;
    let ebpf_dir = ebpf_dir.to_str().context("proxy-ebpf path is not UTF-8")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "proxy-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
