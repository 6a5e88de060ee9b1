//! The fallback of last resort: bytes go through a user-space buffer.

use tokio::net::TcpStream;

use super::{
    pump::{self, DirectionError, Moved, Side},
    DataPlane, Tunnel, TunnelFuture,
};

/// Size of each direction's buffer.
const BUFFER_BYTES: usize = 256 * 1024;

/// User-space copy data plane.
#[derive(Debug, Default)]
pub struct CopyDataPlane;

impl DataPlane for CopyDataPlane {
    fn name(&self) -> &'static str {
        "copy"
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
            let (up, down) = Moved::pair(&progress, "copy");
            let driven = pump::Driven {
                client: &client,
                upstream: &upstream,
                moved: (&up, &down),
                name: "copy",
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

async fn copy_one_way(
    src: &TcpStream,
    dst: &TcpStream,
    moved: &Moved,
    src_side: Side,
) -> Result<(), DirectionError> {
    let mut buf = vec![0u8; BUFFER_BYTES];
    loop {
        src.readable().await.map_err(|e| src_side.error(e))?;
        let n = match src.try_read(&mut buf) {
            Ok(0) => return pump::shutdown_write(dst).map_err(|e| src_side.peer().error(e)),
            Ok(n) => n,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(err) => return Err(src_side.error(err)),
        };
        let mut written = 0;
        while written < n {
            dst.writable().await.map_err(|e| src_side.peer().error(e))?;
            match dst.try_write(&buf[written..n]) {
                Ok(m) => written += m,
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(err) => return Err(src_side.peer().error(err)),
            }
        }
        moved.add(n);
    }
}
