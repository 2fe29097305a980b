"""The supervisord driver's own XML-RPC codec against the standard library's (the reference).

The driver avoids `xmlrpc.client` only for its import cost (http.client, email, ssl); whatever
supervisord can send must decode as the stdlib decodes it, and our calls must read back exactly.
"""

from __future__ import annotations

import xmlrpc.client

import pytest
from hypothesis import given, settings, strategies as st

from agent.drivers import _xmlrpc

# XML 1.0 cannot carry most control characters (neither codec can), and it normalises \r: left out.
text = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Cn")) | st.sampled_from("\t\n"), max_size=40)
scalars = st.one_of(text, st.integers(-2**31, 2**31 - 1), st.booleans(),
                    st.floats(allow_nan=False, allow_infinity=False))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(text, inner, max_size=4)),
                      max_leaves=12)


@settings(max_examples=150, deadline=None)
@given(values)
def test_responses_decode_as_the_stdlib_encodes_them(value):
    wire = xmlrpc.client.dumps((value,), methodresponse=True, allow_none=True).encode()
    assert _xmlrpc.loads_response(wire) == value


@settings(max_examples=150, deadline=None)
@given(st.lists(values, max_size=3))
def test_calls_read_back_with_the_stdlib(params):
    got, method = xmlrpc.client.loads(_xmlrpc.dumps_call("supervisor.startProcess", tuple(params)))
    assert method == "supervisor.startProcess" and list(got) == params


def test_faults_become_fault_with_code_and_string():
    wire = xmlrpc.client.dumps(xmlrpc.client.Fault(70, "NOT_RUNNING: web"), methodresponse=True).encode()
    with pytest.raises(_xmlrpc.Fault) as err:
        _xmlrpc.loads_response(wire)
    assert err.value.faultCode == 70 and err.value.faultString == "NOT_RUNNING: web"


def test_untyped_value_is_a_string_and_nil_is_none():
    wire = (b"<?xml version='1.0'?><methodResponse><params><param><value><array><data>"
            b"<value>bare &amp; text</value><value><nil/></value><value><i8>8589934592</i8></value>"
            b"</data></array></value></param></params></methodResponse>")
    assert _xmlrpc.loads_response(wire) == ["bare & text", None, 8589934592]


@pytest.mark.parametrize("raw, why", [
    (b"HTTP/1.0 401 Unauthorized\r\n\r\n", "HTTP 401 Unauthorized"),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 50\r\n\r\n<methodResponse>", "truncated"),
    (b"garbage", "closed before"),
    (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP response"),
])
def test_bad_http_is_a_protocol_error(raw, why):
    with pytest.raises(_xmlrpc.ProtocolError, match=why):
        _xmlrpc._http_body(raw)


@pytest.mark.parametrize("wire", [b"<methodResponse><params>", b"<methodResponse><params></params></methodResponse>",
                                  b"<methodResponse><params><param><value><base64>eA==</base64></value></param></params>"
                                  b"</methodResponse>"])
def test_malformed_or_unexpected_bodies_are_protocol_errors(wire):
    with pytest.raises(_xmlrpc.ProtocolError):
        _xmlrpc.loads_response(wire)


@settings(max_examples=150, deadline=None)
@given(values)
def test_the_plain_form_is_read_without_expat_and_as_expat_reads_it(value):
    """xmlrpclib's own form (supervisord's answers) takes the regex path: the same values, faster."""
    wire = xmlrpc.client.dumps((value,), methodresponse=True, allow_none=True).encode()
    if any(c in wire.decode() for c in "&"):        # an escaped <, > or &: expat's part
        with pytest.raises(_xmlrpc._Unusual):
            _xmlrpc._plain(wire)
    else:
        assert _xmlrpc._plain(wire) == _xmlrpc._parsed(wire) == (False, value)


def _response(inner: str) -> bytes:
    return f"<?xml version='1.0'?>\n<methodResponse>\n<params>\n<param>\n{inner}\n</param>\n</params>\n</methodResponse>\n".encode()


@pytest.mark.parametrize("inner", [
    "<value><string>a &amp; b &lt;c&gt; &#65;</string></value>",                   # entities
    "<value><!-- a comment --><string>x</string></value>",
    "<value><string><![CDATA[<raw> & text]]></string></value>",
    "<value><array><data>\r\n<value><int>1</int></value>\r\n</data></array></value>",   # \r\n line ends
    "<value><string>one\r\ntwo\rthree</string></value>",                              # XML normalises \r
    "<value>\n  <struct>\n  <member><name>k</name>\n <value> <int> 7 </int> </value></member></struct></value>",
    "<value><struct><member><name>k</name><value><string/></value></member></struct></value>",
    '<value><struct id="x"><member><name>k</name><value><boolean>1</boolean></value></member></struct></value>',
    "<value><array><data><value><struct><member><name>a</name><value><array><data><value><nil/></value>"
    "<value>bare</value></data></array></value></member></struct></value></data></array></value>",
])
def test_any_other_form_decodes_as_the_stdlib_decodes_it(inner):
    wire = _response(inner)
    assert _xmlrpc.loads_response(wire) == xmlrpc.client.loads(wire, use_builtin_types=False)[0][0]


@pytest.mark.parametrize("inner", [
    "<value><struct></array></value>",                                          # mismatched close
    "<value><int>1</int></value><value><int>2</int></value>",                   # two results
    "<value><struct><member><name>a</name><value><array><data></data></array></value></struct></value>",
    "<value><array><data><value><int>1</int></value></data></array>",          # unclosed value
])
def test_malformed_plain_looking_bodies_are_protocol_errors(inner):
    with pytest.raises(_xmlrpc.ProtocolError):
        _xmlrpc.loads_response(_response(inner))


@pytest.mark.parametrize("inner", [
    "<value><array><data><member><name>a</name><value><int>1</int></value></member></data></array></value>",
    "<value><struct><value><int>1</int></value></struct></value>",              # a bare value in a struct
])
def test_well_formed_but_odd_bodies_are_left_to_expat(inner):
    """Not XML-RPC, but XML: the regex path declines them and they decode as they always did."""
    with pytest.raises(_xmlrpc._Unusual):
        _xmlrpc._plain(_response(inner))
    assert _xmlrpc.loads_response(_response(inner)) == _xmlrpc._parsed(_response(inner))[1]
