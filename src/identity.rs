//! Who is at the other end of a connection: the identity in a verified client certificate
//! (its subject's common name and its subject alternative names). The listener puts an
//! `Arc<ClientCert>` into the extensions of every request on a connection whose client
//! presented a certificate chaining to `server.tls.client_ca_file`; authorization reads it
//! from there. Pure: reads DER, does no I/O and verifies nothing (rustls did).

use std::net::IpAddr;

/// The identity a verified client certificate names.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientCert {
    /// The subject's common name (its last CN attribute), if it has one.
    pub common_name: Option<String>,
    /// DNS names among the subject alternative names.
    pub dns_names: Vec<String>,
    /// E-mail addresses (rfc822Name) among them.
    pub emails: Vec<String>,
    /// URIs among them (SPIFFE ids, for instance).
    pub uris: Vec<String>,
    /// IP addresses among them.
    pub ips: Vec<IpAddr>,
}

/// Object identifiers, as their DER content bytes.
const OID_COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
const OID_SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];

impl ClientCert {
    /// Reads the identity from a DER X.509 certificate; `None` when it is not one.
    pub fn from_der(der: &[u8]) -> Option<ClientCert> {
        let (tag, cert) = Der(der).next()?;
        if tag != SEQUENCE {
            return None;
        }
        let (tag, tbs) = Der(cert).next()?;
        if tag != SEQUENCE {
            return None;
        }
        let mut fields = Der(tbs);
        let mut field = fields.next()?;
        if field.0 == 0xa0 {
            field = fields.next()?; // [0] version
        }
        // serialNumber (already in `field`), signature, issuer, validity, subject.
        for _ in 0..4 {
            field = fields.next()?;
        }
        let (tag, subject) = field;
        if tag != SEQUENCE {
            return None;
        }
        let mut id = ClientCert {
            common_name: common_name(subject)?,
            ..ClientCert::default()
        };
        fields.next()?; // subjectPublicKeyInfo
        while let Some((tag, value)) = fields.next() {
            if tag == 0xa3 {
                read_extensions(value, &mut id)?;
            }
        }
        Some(id)
    }
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const OCTET_STRING: u8 = 0x04;

/// The CN of a Name (SEQUENCE OF SET OF {type, value}); `Some(None)` when it has none.
fn common_name(name: &[u8]) -> Option<Option<String>> {
    let mut cn = None;
    let mut rdns = Der(name);
    while let Some((tag, rdn)) = rdns.next() {
        if tag != SET {
            return None;
        }
        let mut attrs = Der(rdn);
        while let Some((tag, attr)) = attrs.next() {
            if tag != SEQUENCE {
                return None;
            }
            let mut parts = Der(attr);
            let (oid_tag, oid) = parts.next()?;
            let (value_tag, value) = parts.next()?;
            if oid_tag == OID && oid == OID_COMMON_NAME {
                cn = Some(directory_string(value_tag, value)?);
            }
        }
    }
    Some(cn)
}

/// A DirectoryString's text: UTF8String, PrintableString, IA5String, TeletexString (read
/// as Latin-1) or BMPString.
fn directory_string(tag: u8, value: &[u8]) -> Option<String> {
    match tag {
        0x0c | 0x13 | 0x16 => String::from_utf8(value.to_vec()).ok(),
        0x14 => Some(value.iter().map(|&b| char::from(b)).collect()),
        0x1e if value.len() % 2 == 0 => {
            let units: Vec<u16> = value
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16(&units).ok()
        }
        _ => None,
    }
}

/// `[3] { SEQUENCE OF Extension }`: fills the subject alternative names.
fn read_extensions(explicit: &[u8], id: &mut ClientCert) -> Option<()> {
    let (tag, list) = Der(explicit).next()?;
    if tag != SEQUENCE {
        return None;
    }
    let mut extensions = Der(list);
    while let Some((tag, ext)) = extensions.next() {
        if tag != SEQUENCE {
            return None;
        }
        let mut parts = Der(ext);
        let (oid_tag, oid) = parts.next()?;
        if oid_tag != OID || oid != OID_SUBJECT_ALT_NAME {
            continue;
        }
        let mut value = parts.next()?;
        if value.0 != OCTET_STRING {
            value = parts.next()?; // critical BOOLEAN
        }
        let (tag, names) = Der(value.1).next()?;
        if value.0 != OCTET_STRING || tag != SEQUENCE {
            return None;
        }
        let mut names = Der(names);
        while let Some((tag, name)) = names.next() {
            let text = || String::from_utf8(name.to_vec()).ok();
            match tag {
                0x81 => id.emails.push(text()?),
                0x82 => id.dns_names.push(text()?),
                0x86 => id.uris.push(text()?),
                0x87 => match name.len() {
                    4 => id.ips.push(IpAddr::from(<[u8; 4]>::try_from(name).ok()?)),
                    16 => id.ips.push(IpAddr::from(<[u8; 16]>::try_from(name).ok()?)),
                    _ => return None,
                },
                _ => {}
            }
        }
    }
    Some(())
}

/// A cursor over DER TLVs (single-byte tags, definite lengths, as DER requires).
struct Der<'a>(&'a [u8]);

impl<'a> Der<'a> {
    /// The next (tag, content); `None` at the end or on malformed input.
    fn next(&mut self) -> Option<(u8, &'a [u8])> {
        let (&tag, rest) = self.0.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
            (len, &rest[n..])
        };
        if rest.len() < len {
            return None;
        }
        let (content, rest) = rest.split_at(len);
        self.0 = rest;
        Some((tag, content))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_common_name_and_alternative_names() {
        let mut params = rcgen::CertificateParams::new(vec!["node-7.example".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "acme");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "ci-runner");
        params.subject_alt_names.extend([
            rcgen::SanType::Rfc822Name("ops@example.com".try_into().unwrap()),
            rcgen::SanType::URI("spiffe://example/runner".try_into().unwrap()),
            rcgen::SanType::IpAddress("10.1.2.3".parse().unwrap()),
            rcgen::SanType::IpAddress("::1".parse().unwrap()),
        ]);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let id = ClientCert::from_der(cert.der()).unwrap();
        assert_eq!(
            id,
            ClientCert {
                common_name: Some("ci-runner".into()),
                dns_names: vec!["node-7.example".into()],
                emails: vec!["ops@example.com".into()],
                uris: vec!["spiffe://example/runner".into()],
                ips: vec!["10.1.2.3".parse().unwrap(), "::1".parse().unwrap()],
            }
        );
    }

    #[test]
    fn a_certificate_without_names_has_an_empty_identity() {
        let params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let id = ClientCert::from_der(cert.der()).unwrap();
        assert!(id.dns_names.is_empty() && id.emails.is_empty() && id.ips.is_empty());
    }

    #[test]
    fn garbage_and_truncation_are_refused_without_panicking() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.example".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = cert.der().to_vec();
        for cut in 0..der.len() {
            assert_eq!(ClientCert::from_der(&der[..cut]), None, "cut at {cut}");
        }
        assert_eq!(ClientCert::from_der(b"not a certificate"), None);
        assert_eq!(ClientCert::from_der(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
    }
}
