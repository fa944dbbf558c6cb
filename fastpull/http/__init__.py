"""HTTP as fastpull speaks it: a small synchronous transport over pycurl and the policy (retries,
redirects, what each answer means) that it shares with the fetch engine. Knows nothing of OCI."""
