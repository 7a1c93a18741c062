//! Checks the Cloud Hypervisor client against a running `cloud-hypervisor
//! --api-socket path=SOCKET`: ping, create a VM from KERNEL, read its info.
//! (Booting needs a KVM that runs guests.)
//!
//! cargo run -p thaw-vmm --example ch_api -- SOCKET KERNEL

use thaw_vmm::cloud_hypervisor::{ChClient, ChVmConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(socket), Some(kernel)) = (args.next(), args.next()) else {
        return Err("usage: ch_api SOCKET KERNEL".into());
    };
    let ch = ChClient::new(socket);
    println!("vmm.ping: {}", ch.ping()?);
    ch.create(&ChVmConfig {
        cpus: 1,
        memory_bytes: 256 << 20,
        kernel: kernel.into(),
        initramfs: None,
        cmdline: "console=ttyS0".into(),
        fs: vec![],
        serial_socket: None,
    })?;
    println!("vm.create: done");
    let info = ch.info()?;
    println!(
        "vm.info: state {}, memory {} bytes, shared {}",
        info["state"], info["config"]["memory"]["size"], info["config"]["memory"]["shared"]
    );
    Ok(())
}
