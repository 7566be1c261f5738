//! Big mail providers, for `checks.impersonation` (Haraka's `big_company`, qpsmtpd's
//! `check_spamhelo` list): a HELO that is a provider's domain, or a name under it, comes from
//! that provider's own servers, and those have forward-confirmed reverse names under the same
//! provider (Gmail's `mail-wr1-f41.google.com`, Microsoft 365's
//! `mail-am6eur05on2098.outbound.protection.outlook.com`, Yahoo's
//! `sonic301-22.consmr.mail.gq1.yahoo.com`). A provider is a group of domains that are one
//! sender: a HELO under `aol.com` from a host named under `yahoo.com` is Yahoo's own.
//!
//! No provider's server greets with the bare domain (`gmail.com`, `yahoo.de`): that is judged
//! without DNS. A name under a provider is judged on the client's forward-confirmed reverse
//! name.

use rustc_hash::FxHashMap;

/// The built-in list: the providers bots name most, each with the domains its servers greet
/// and are named under. README ("Impersonation") lists them; `impersonation.providers` adds to
/// them (a provider of the same name gets more domains).
pub const BUILTIN: &[(&str, &[&str])] = &[
    ("Google", &["google.com", "gmail.com", "googlemail.com", "1e100.net"]),
    (
        "Microsoft",
        &[
            "outlook.com",
            "hotmail.com",
            "live.com",
            "msn.com",
            "microsoft.com",
            "office365.com",
            "hotmail.co.uk",
            "hotmail.fr",
            "hotmail.de",
            "hotmail.it",
            "live.co.uk",
            "live.fr",
        ],
    ),
    (
        "Yahoo",
        &[
            "yahoo.com",
            "yahoo.co.uk",
            "yahoo.de",
            "yahoo.fr",
            "yahoo.es",
            "yahoo.it",
            "yahoo.ca",
            "yahoo.com.br",
            "yahoo.co.in",
            "yahoo.com.au",
            "ymail.com",
            "rocketmail.com",
            "aol.com",
            "aim.com",
        ],
    ),
    ("Yahoo Japan", &["yahoo.co.jp"]),
    ("Apple", &["icloud.com", "me.com", "mac.com", "apple.com"]),
    ("Amazon", &["amazon.com", "amazonses.com"]),
    (
        "Yandex",
        &["yandex.ru", "yandex.com", "yandex.net", "ya.ru", "yandex.ua", "yandex.by", "yandex.kz"],
    ),
    ("Mail.ru", &["mail.ru", "list.ru", "bk.ru", "inbox.ru", "internet.ru"]),
    ("Rambler", &["rambler.ru"]),
    ("NetEase", &["163.com", "126.com", "yeah.net", "188.com", "netease.com"]),
    ("Tencent", &["qq.com", "foxmail.com"]),
    ("Sina", &["sina.com", "sina.cn", "sina.com.cn"]),
    ("Sohu", &["sohu.com"]),
    ("Alibaba", &["aliyun.com", "alibaba-inc.com"]),
    ("United Internet", &["gmx.net", "gmx.de", "gmx.com", "web.de", "mail.com"]),
    ("Proton", &["protonmail.com", "protonmail.ch", "proton.me", "pm.me"]),
    ("Fastmail", &["fastmail.com", "fastmail.fm", "messagingengine.com"]),
    ("Zoho", &["zoho.com", "zohomail.com", "zoho.eu"]),
    ("Comcast", &["comcast.net"]),
    ("Orange", &["orange.fr", "wanadoo.fr"]),
    ("T-Online", &["t-online.de"]),
    ("Naver", &["naver.com"]),
    ("Kakao", &["daum.net", "hanmail.net"]),
    ("EarthLink", &["earthlink.net"]),
];

/// The providers in force: each a name and its domains (lower case, A-labels).
#[derive(Clone, Debug, Default)]
pub struct Providers {
    names: Vec<String>,
    /// Each domain and its provider (an index into `names`).
    domains: FxHashMap<String, usize>,
}

/// What a HELO names of a provider.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Named<'a> {
    /// The provider's index, for [`Providers::covers`].
    provider: usize,
    pub name: &'a str,
    /// The provider's domain the HELO is, or is under.
    pub domain: &'a str,
    /// The HELO is the domain itself (`gmail.com`).
    pub apex: bool,
}

impl Providers {
    /// The built-in list (with `builtin`) and `extra` (name, domains: normalized already).
    pub fn new(builtin: bool, extra: &[(String, Vec<String>)]) -> Result<Self, String> {
        let mut providers = Providers::default();
        let listed = BUILTIN.iter().filter(|_| builtin).map(|(name, domains)| {
            ((*name).to_owned(), domains.iter().map(|d| (*d).to_owned()).collect::<Vec<_>>())
        });
        for (name, domains) in listed.chain(extra.iter().cloned()) {
            let index = match providers.names.iter().position(|n| n.eq_ignore_ascii_case(&name)) {
                Some(index) => index,
                None => {
                    providers.names.push(name.clone());
                    providers.names.len() - 1
                }
            };
            for domain in domains {
                if let Some(&other) = providers.domains.get(&domain)
                    && other != index
                {
                    return Err(format!(
                        "{domain} is listed for {name} and for {}: a domain belongs to one \
                         provider",
                        providers.names[other]
                    ));
                }
                providers.domains.insert(domain, index);
            }
        }
        Ok(providers)
    }

    pub fn is_empty(&self) -> bool {
        self.domains.is_empty()
    }

    /// The provider `name` (a normalized host name) is a domain of, or a name under.
    pub fn named(&self, name: &str) -> Option<Named<'_>> {
        let mut suffix = name;
        loop {
            if let Some((domain, &provider)) = self.domains.get_key_value(suffix) {
                return Some(Named {
                    provider,
                    name: &self.names[provider],
                    domain,
                    apex: suffix.len() == name.len(),
                });
            }
            suffix = suffix.split_once('.')?.1;
        }
    }

    /// Whether `host` (a forward-confirmed reverse name) is one of `named`'s provider's own.
    pub fn covers(&self, named: &Named<'_>, host: &str) -> bool {
        self.named(host).is_some_and(|own| own.provider == named.provider)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_matched_to_its_provider_by_its_domains() {
        let providers = Providers::new(true, &[]).unwrap();
        let google = providers.named("mail-wr1-f41.google.com").unwrap();
        assert_eq!((google.name, google.domain, google.apex), ("Google", "google.com", false));
        assert!(providers.named("gmail.com").unwrap().apex);
        assert!(providers.named("notgmail.com").is_none(), "whole labels only");
        assert!(providers.named("mail.example.com").is_none());
        assert!(providers.covers(&google, "mail-wr1-f41.google.com"));
        assert!(providers.covers(&providers.named("gmail.com").unwrap(), "x.1e100.net"));
        let aol = providers.named("smtp.aol.com").unwrap();
        assert!(providers.covers(&aol, "sonic301-22.consmr.mail.gq1.yahoo.com"), "one sender");
        assert!(!providers.covers(&google, "vps1.hoster.example"));
    }

    #[test]
    fn the_admin_adds_providers_and_domains() {
        let extra = [
            ("Example Bank".to_owned(), vec!["examplebank.com".to_owned()]),
            ("google".to_owned(), vec!["google.de".to_owned()]),
        ];
        let providers = Providers::new(true, &extra).unwrap();
        assert_eq!(providers.named("smtp.examplebank.com").unwrap().name, "Example Bank");
        assert_eq!(providers.named("google.de").unwrap().name, "Google", "same name: extended");
        let only = Providers::new(false, &extra[..1]).unwrap();
        assert!(only.named("gmail.com").is_none(), "impersonation.builtin = false");
        let clash = [("Mine".to_owned(), vec!["gmail.com".to_owned()])];
        assert!(Providers::new(true, &clash).unwrap_err().contains("one provider"));
    }
}
