//! DNS interface: `NAME.service.DOMAIN` answers A/AAAA and SRV records of the passing
//! instances, straight from the in-memory catalog. TTL 0 so resolvers never serve a
//! node that has just left.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Header, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_server::authority::MessageResponseBuilder;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::ServerFuture;

use crate::state::Shared;

/// Answers service queries from the catalog.
pub struct DnsHandler {
    shared: Arc<Shared>,
    /// `service.DOMAIN.`, lowercase.
    service_suffix: String,
    /// `addr.DOMAIN.`: SRV targets resolve here.
    addr_suffix: String,
}

impl DnsHandler {
    /// A handler for `domain` (e.g. `flotilla`).
    pub fn new(shared: Arc<Shared>, domain: &str) -> Self {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        DnsHandler {
            shared,
            service_suffix: format!(".service.{domain}."),
            addr_suffix: format!(".addr.{domain}."),
        }
    }

    /// Records answering `qname`/`qtype`; `None` for a name we do not know (NXDOMAIN).
    pub fn answer(&self, qname: &str, qtype: RecordType) -> Option<(Vec<Record>, Vec<Record>)> {
        let qname = qname.to_ascii_lowercase();
        let name = Name::from_str(&qname).ok()?;
        if let Some(service) = qname.strip_suffix(&self.service_suffix) {
            let catalog = self.shared.catalog();
            if !catalog.knows_service(service) {
                return None;
            }
            let instances = catalog.service(service, true);
            let mut answers = Vec::new();
            let mut additionals = Vec::new();
            for inst in &instances {
                match qtype {
                    RecordType::SRV => {
                        let target = Name::from_str(&format!(
                            "{}{}",
                            hex_label(&inst.address),
                            self.addr_suffix
                        ))
                        .ok()?;
                        let weight = inst.weight.min(u16::MAX as u32) as u16;
                        answers.push(Record::from_rdata(
                            name.clone(),
                            0,
                            RData::SRV(SRV::new(1, weight, inst.port, target.clone())),
                        ));
                        additionals.push(address_record(target, inst.address));
                    }
                    RecordType::A if inst.address.is_ipv4() => {
                        answers.push(address_record(name.clone(), inst.address))
                    }
                    RecordType::AAAA if inst.address.is_ipv6() => {
                        answers.push(address_record(name.clone(), inst.address))
                    }
                    _ => {}
                }
            }
            return Some((answers, additionals));
        }
        if let Some(label) = qname.strip_suffix(&self.addr_suffix) {
            let ip = parse_hex_label(label)?;
            let fits = matches!(
                (qtype, ip),
                (RecordType::A, IpAddr::V4(_)) | (RecordType::AAAA, IpAddr::V6(_))
            );
            return Some((
                if fits {
                    vec![address_record(name, ip)]
                } else {
                    vec![]
                },
                vec![],
            ));
        }
        None
    }
}

/// SRV targets are names; encoding the address in the label needs no extra state.
fn hex_label(ip: &IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => hex::encode(v4.octets()),
        IpAddr::V6(v6) => hex::encode(v6.octets()),
    }
}

fn parse_hex_label(label: &str) -> Option<IpAddr> {
    let bytes = hex::decode(label).ok()?;
    match bytes.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => None,
    }
}

fn address_record(name: Name, ip: IpAddr) -> Record {
    let rdata = match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    };
    Record::from_rdata(name, 0, rdata)
}

#[async_trait::async_trait]
impl RequestHandler for DnsHandler {
    async fn handle_request<R: ResponseHandler>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        self.shared.metrics.dns_queries.inc();
        let builder = MessageResponseBuilder::from_message_request(request);
        let mut header = Header::response_from_request(request.header());
        header.set_message_type(MessageType::Response);
        header.set_authoritative(true);
        if request.op_code() != OpCode::Query || request.message_type() != MessageType::Query {
            let resp = builder.error_msg(request.header(), ResponseCode::NotImp);
            return response
                .send_response(resp)
                .await
                .unwrap_or_else(|_| header.into());
        }
        let query = request.query();
        let qname = query.name().to_string();
        match self.answer(&qname, query.query_type()) {
            Some((answers, additionals)) => {
                let resp = builder.build(
                    header,
                    answers.iter(),
                    [].iter(),
                    [].iter(),
                    additionals.iter(),
                );
                response
                    .send_response(resp)
                    .await
                    .unwrap_or_else(|_| header.into())
            }
            None => {
                header.set_response_code(ResponseCode::NXDomain);
                let resp = builder.build_no_records(header);
                response
                    .send_response(resp)
                    .await
                    .unwrap_or_else(|_| header.into())
            }
        }
    }
}

/// Binds UDP and TCP on `addr` and serves until the process ends.
pub async fn serve(
    shared: Arc<Shared>,
    addr: SocketAddr,
    domain: &str,
) -> std::io::Result<ServerFuture<DnsHandler>> {
    let mut server = ServerFuture::new(DnsHandler::new(shared, domain));
    server.register_socket(tokio::net::UdpSocket::bind(addr).await?);
    server.register_listener(
        tokio::net::TcpListener::bind(addr).await?,
        Duration::from_secs(5),
    );
    Ok(server)
}
