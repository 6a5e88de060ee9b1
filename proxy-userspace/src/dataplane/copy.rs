//! The fallback of last resort: bytes go through a user-space buffer.

use std::{
    ops::{Deref, DerefMut},
    ptr::NonNull,
};

use tokio::net::TcpStream;

use super::{
    pump::{self, DirectionError, Moved},
    DataPlane, DataPlaneChoice, Picked, PlaneKind, Side, Tunnel, TunnelFuture,
};

/// Size of each direction's buffer.
const BUFFER_BYTES: usize = 256 * 1024;

/// User-space copy data plane.
#[derive(Debug, Default)]
pub struct CopyDataPlane;

impl DataPlane for CopyDataPlane {
    fn name(&self) -> DataPlaneChoice {
        DataPlaneChoice::Copy
    }

    fn pick(&self, _tunnel: &Tunnel) -> Picked<'_> {
        (PlaneKind::Copy, self)
    }

    fn planes(&self) -> Vec<PlaneKind> {
        vec![PlaneKind::Copy]
    }

    fn run(&self, tunnel: Tunnel) -> TunnelFuture {
        Box::pin(async move {
            let Tunnel {
                client,
                upstream,
                limits,
                shutdown,
                progress,
                ..
            } = tunnel;
            let (up, down) = Moved::pair(&progress, PlaneKind::Copy);
            let driven = pump::Driven {
                client: &client,
                upstream: &upstream,
                moved: (&up, &down),
                name: PlaneKind::Copy,
                limits,
                shutdown,
            };
            pump::drive(
                driven,
                copy_one_way(&client, &upstream, &up, Side::Client),
                copy_one_way(&upstream, &client, &down, Side::Upstream),
            )
            .await
        })
    }
}

/// Copies `src` → `dst` until `src`'s EOF, then half-closes `dst`.
pub(crate) async fn copy_one_way(
    src: &TcpStream,
    dst: &TcpStream,
    moved: &Moved,
    src_side: Side,
) -> Result<(), DirectionError> {
    let mut buf: Box<dyn DerefMut<Target = [u8]> + Send> = match MappedBuffer::new() {
        Some(mapped) => Box::new(mapped),
        None => Box::new(vec![0u8; BUFFER_BYTES]),
    };
    loop {
        src.readable()
            .await
            .map_err(|e| pump::error_on(src_side, e))?;
        let n = match src.try_read(&mut buf) {
            Ok(0) => {
                return pump::shutdown_write(dst).map_err(|e| pump::error_on(src_side.peer(), e))
            }
            Ok(n) => n,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(err) => return Err(pump::error_on(src_side, err)),
        };
        let mut written = 0;
        while written < n {
            dst.writable()
                .await
                .map_err(|e| pump::error_on(src_side.peer(), e))?;
            match dst.try_write(&buf[written..n]) {
                Ok(m) => written += m,
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(err) => return Err(pump::error_on(src_side.peer(), err)),
            }
        }
        moved.add(n);
    }
}

/// A direction's buffer in an anonymous mapping of its own instead of the heap.
///
/// From the heap (`vec![0; BUFFER_BYTES]`, zeroed) every tunnel, idle or not,
/// cost ~270 KiB of resident memory, and closed tunnels left it resident in the
/// allocator's arenas, fragmented: after a spike of 9,900 copy tunnels closed
/// RSS stayed at 2.7 GB, and a second spike took it to 5.2 GB
/// (tests/tests/floods.rs, `many_open_tunnels`). A mapping's pages become
/// resident only as bytes go through them (~16 KiB per idle tunnel), and all go
/// back to the kernel when the tunnel ends.
struct MappedBuffer(NonNull<u8>);

// SAFETY: the mapping belongs to this value alone, like the memory of a `Box<[u8]>`.
unsafe impl Send for MappedBuffer {}

impl MappedBuffer {
    /// A new zero-filled buffer, or `None` if the kernel has no mapping to give
    /// (e.g. `vm.max_map_count` reached): the caller then uses the heap.
    fn new() -> Option<Self> {
        // SAFETY: an anonymous private mapping at an address the kernel picks.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                BUFFER_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        NonNull::new(ptr.cast()).map(Self)
    }
}

impl Deref for MappedBuffer {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: BUFFER_BYTES of readable memory, zero-filled by the kernel,
        // mapped as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr(), BUFFER_BYTES) }
    }
}

impl DerefMut for MappedBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and writable; `&mut self` makes it exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_ptr(), BUFFER_BYTES) }
    }
}

impl Drop for MappedBuffer {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once; no slice of it outlives `self`.
        unsafe { libc::munmap(self.0.as_ptr().cast(), BUFFER_BYTES) };
    }
}
