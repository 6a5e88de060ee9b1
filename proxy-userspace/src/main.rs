fn main() { let b = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf")); println!("{}", b.len()); }
