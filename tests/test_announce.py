"""The service address announced: a burst of gratuitous ARP at promotion,
a second one announce_again later for neighbours that missed the first, one
on request (SIGUSR2, 'announce'), and for an IPv6 address unsolicited
neighbour advertisements.  The LAN's own neighbour table is the witness:
an entry left pointing elsewhere is corrected by the announcement alone."""

import os
import signal
import sys
import time

import bed as bedmod
from helpers import Running, S, init, service_config, serving, wait_for

BOGUS = "02:00:5e:00:53:99"      # a MAC nobody on the LAN has


def stale(bed, address, family="-4"):
    """The LAN's entry for address points elsewhere, as after a failover
    whose announcement it missed."""
    bed.lan_run(["ip", family, "neigh", "replace", address, "lladdr", BOGUS, "dev", "br0",
                 "nud", "stale"])


def neighbour(bed, address, family="-4"):
    out = bed.lan_run(["ip", family, "neigh", "show", address, "dev", "br0"]).stdout
    return out.split("lladdr ")[1].split()[0] if "lladdr" in out else ""


def test_announced_at_promotion_again_later_and_on_request(lanbed):
    bed = lanbed
    a, b = bed.a, bed.b
    service_config(bed, service={"announce_again": "%g" % S(3)})
    init(bed)
    da, db = Running(a).wait_ready(), Running(b).wait_ready()
    try:
        assert wait_for(lambda: serving(da), S(30), step=0.05)
        mac_a, mac_b = bed.lan_mac(a), bed.lan_mac(b)
        # the first burst came with the address; the second follows by itself
        stale(bed, bed.SERVICE_ADDRESS)
        assert wait_for(lambda: neighbour(bed, bed.SERVICE_ADDRESS) == mac_a, S(10),
                        step=0.1), "the second announcement did not come"
        time.sleep(1.0)                 # the rest of that burst (5 packets, 0.05 s apart)
        # on request: SIGUSR2 to the daemon, and the command
        stale(bed, bed.SERVICE_ADDRESS)
        time.sleep(1.0)
        assert neighbour(bed, bed.SERVICE_ADDRESS) == BOGUS      # nothing else corrects it
        os.kill(da.proc.pid, signal.SIGUSR2)
        assert wait_for(lambda: neighbour(bed, bed.SERVICE_ADDRESS) == mac_a, S(5), step=0.05)
        time.sleep(1.0)
        stale(bed, bed.SERVICE_ADDRESS)
        r = a.flocker("announce")
        assert r.returncode == 0 and "announces 192.0.2.150/28 dev lan0 again" in r.stdout, r
        assert wait_for(lambda: neighbour(bed, bed.SERVICE_ADDRESS) == mac_a, S(5), step=0.05)
        r = b.flocker("announce")                       # the slave has nothing to announce
        assert r.returncode == 1 and "only the serving master announces it" in r.stderr, r
        # a failover: beta's burst reaches the LAN within the burst itself
        time.sleep(1.0)
        stale(bed, bed.SERVICE_ADDRESS)
        a.kill_all(keep_sshd=True)
        assert wait_for(lambda: serving(db), S(30), step=0.05)
        assert wait_for(lambda: neighbour(bed, bed.SERVICE_ADDRESS) == mac_b, S(2), step=0.05)
    finally:
        da.stop()
        db.stop()


ANNOUNCE = ("import sys; sys.path.insert(0, sys.argv[1]); import flocker_failover as ff; "
            "print(ff.announce_address(ff._p_service_address(sys.argv[2]), 3, 0.05))")


def test_an_ipv6_address_is_announced_by_neighbour_advertisements(lanbed):
    bed = lanbed
    a = bed.a
    address = "2001:db8:0:150::150"
    bed.lan_run(["ip", "-6", "addr", "add", "2001:db8:0:150::1/64", "dev", "br0", "nodad"])
    a.run(["ip", "-6", "addr", "add", address + "/64", "dev", "lan0", "nodad"])
    stale(bed, address, "-6")
    assert neighbour(bed, address, "-6") == BOGUS
    out = a.run([sys.executable, "-c", ANNOUNCE, bedmod.ROOT,
                 "%s/64 dev lan0" % address]).stdout
    assert out.strip() == "3"
    assert wait_for(lambda: neighbour(bed, address, "-6") == bed.lan_mac(a), S(5), step=0.05)
