# syntax=docker/dockerfile:1
#
# spliced's container image:
#   docker build -t REGISTRY/spliced:0.1.0 .
# Without a registry, `cargo xtask image` builds this file's last stage with
# podman from a Debian base made by mmdebstrap and the binary built by xtask
# (README, "Container image"); keep that stage's FROM and single
# COPY --from=build as they are, xtask substitutes them.
#
# Stage `build` builds what `cargo xtask build` builds, with the same
# prerequisites as xtask/src/prereq.rs installs; tests/tests/deploy.rs checks
# that the two agree and runs this stage's build command on a copy of the
# build context.

FROM rust:1.95-bookworm AS build

# Debian's LLVM 22 (bookworm-security) for bpf-linker: its LLVM major must be
# the one of the nightly rustc that compiles the eBPF object.
RUN apt-get update \
    && apt-get install -y --no-install-recommends llvm-22-dev libpolly-22-dev \
    && rm -rf /var/lib/apt/lists/*

# The nightly toolchain with rust-src (the eBPF object is built with
# -Z build-std=core), pinned to the nightly of the development machines and
# CI. proxy-userspace/build.rs runs `rustup run nightly cargo build ...`, and
# rustup cannot link a toolchain under an official channel name, so the dated
# toolchain also answers to `nightly` through a symlink.
ARG NIGHTLY=nightly-2026-05-20
RUN host="$(rustc -vV | sed -n 's/^host: //p')" \
    && rustup toolchain install "$NIGHTLY" --profile minimal --component rust-src \
    && ln -s "$NIGHTLY-$host" "$RUSTUP_HOME/toolchains/nightly-$host" \
    && rustup run nightly rustc --version

# bpf-linker against LLVM 22, as `cargo xtask setup` builds it.
RUN LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --version 0.13.0 --locked \
    --no-default-features --features llvm-22

WORKDIR /src
COPY . .
# proxy-userspace's build.rs builds the eBPF object first. --locked: the
# image gets exactly the versions of Cargo.lock.
RUN cargo build --release --locked --package proxy-userspace

FROM debian:bookworm-slim

# The binary needs glibc and libgcc_s only (both in bookworm-slim, the
# release the build stage links against). CA certificates are the image's
# only package: spliced makes no TLS connection of its own today, but the
# image is the base operators extend (health checks, helpers).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/spliced /usr/local/bin/spliced

# Root on purpose: the eBPF data plane needs CAP_BPF, CAP_NET_ADMIN and
# CAP_PERFMON. Kubernetes cannot give capabilities to a non-root process
# (they reach it only as ambient capabilities, which pods cannot set), and
# file capabilities would need allowPrivilegeEscalation. The pod spec limits
# root to those capabilities instead (deploy/kubernetes).
USER root
EXPOSE 3128
ENTRYPOINT ["/usr/local/bin/spliced"]
CMD ["-f", "/etc/spliced/squid.conf"]
