//! Sockets with a twist: clients with a chosen source address, and listeners
//! that never complete a handshake.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    time::Duration,
};

use socket2::{Domain, Socket, Type};

use crate::{netns::Netns, IO_TIMEOUT};

/// Connects to `to` from source address `from` (any port), with the read and
/// write timeouts of every test socket.
pub fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(to), Type::STREAM, None)?;
    socket.bind(&SocketAddr::new(from, 0).into())?;
    socket.connect_timeout(&to.into(), IO_TIMEOUT)?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// A listener on 127.0.0.1 of `ns` whose accept queue (backlog 1) is full and
/// never accepted from, so further SYNs to it are dropped: connecting to it
/// hangs until the connecting side gives up. Keep both values alive while it
/// is needed.
pub fn black_hole(ns: &Netns) -> (Socket, Vec<Socket>) {
    ns.enter(|| {
        let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        listener
            .bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())
            .unwrap();
        listener.listen(1).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut fillers = Vec::new();
        for _ in 0..16 {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            let filled = socket
                .connect_timeout(&addr, Duration::from_millis(300))
                .is_err();
            fillers.push(socket);
            if filled {
                return (listener, fillers);
            }
        }
        panic!("16 connections did not fill an accept queue of backlog 1");
    })
}

/// `tcpi_bytes_received` of `stream`: the sequence space it has received
/// (payload bytes, plus one for a FIN).
pub fn bytes_received(stream: &TcpStream) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd as _;
    // tcpi_bytes_received is at offset 128 of struct tcp_info (stable UAPI).
    let mut raw = [0u8; 232];
    let mut len = raw.len() as libc::socklen_t;
    // SAFETY: `raw` is a writable buffer of `len` bytes for the whole call.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            raw.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(u64::from_ne_bytes(
        raw[128..136].try_into().expect("8 bytes"),
    ))
}
