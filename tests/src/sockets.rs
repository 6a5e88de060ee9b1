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
