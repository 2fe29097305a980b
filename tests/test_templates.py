"""File templates (DESIGN §3a "Files"): sandboxed, strict, byte-exact, and no secret in any error."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jinja2.sandbox import unsafe

from agent.core.errors import Permanent
from agent.core.render.files import (
    MAX_OUTPUT_BYTES,
    TemplateProblem,
    placeholder_secrets,
    render_template,
    secrets_context,
)

SECRET = 'p%a,s"s= w\'rd'          # every character a parser could split or expand on
OTHER_SECRET = "hunter2"            # a plain name: a message could show it as a key


def context(**extra):
    ctx = {
        "host": {"name": "web-1", "groups": ["web", "eu"], "labels": {"dc": "fra1"}},
        "app": {"name": "shop", "data_dir": "/var/lib/gitops-agent/apps/shop/data"},
        "services": {"shop-web": {"port": 8200}, "shop-worker": {"port": None}},
        "secrets": secrets_context({"django": {"SECRET_KEY": SECRET, "DB": OTHER_SECRET}}),
    }
    ctx.update(extra)
    return ctx


def problem(source: str, name: str = "f.txt", ctx=None) -> TemplateProblem:
    with pytest.raises(TemplateProblem) as info:
        render_template(source, name, context() if ctx is None else ctx)
    return info.value


# --- rendering ---------------------------------------------------------------------------------------


def test_renders_the_whole_context():
    source = (
        "[server]\n"
        "host = \"{{ host.name }}\"\n"
        "groups = {{ host.groups | join(',') }}\n"
        "dc = {{ host.labels.dc }}\n"
        "app = {{ app.name }} in {{ app.data_dir }}\n"
        "port = {{ services['shop-web'].port }}\n"
        "{% for name, svc in services | dictsort %}{{ name }}={{ svc.port }};{% endfor %}\n"
        "key = {{ secrets.django.SECRET_KEY }}\n"
        "db = {{ secrets.django['DB'] }}\n"
    )
    assert render_template(source, "settings.toml.j2", context()) == (
        "[server]\n"
        "host = \"web-1\"\n"
        "groups = web,eu\n"
        "dc = fra1\n"
        "app = shop in /var/lib/gitops-agent/apps/shop/data\n"
        "port = 8200\n"
        "shop-web=8200;shop-worker=None;\n"
        f"key = {SECRET}\n"
        f"db = {OTHER_SECRET}\n"
    )


@pytest.mark.parametrize("source", ["a\n", "a\n\n\n", "a", "", "\n", "{{ 1 }}\n", "x  \n\t\n"])
def test_output_is_byte_exact_and_keeps_trailing_newlines(source):
    expected = source.replace("{{ 1 }}", "1")
    assert render_template(source, "f.conf", {}) == expected


def test_crlf_template_renders_crlf():
    assert render_template("a = {{ 1 }}\r\nb\r\n", "f.ini", {}) == "a = 1\r\nb\r\n"


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
@settings(max_examples=200, deadline=None)
def test_any_secret_value_renders_exactly(value):
    ctx = {"secrets": secrets_context({"s": {"K": value}})}
    assert render_template("{{ secrets.s.K }}", "f.env", ctx) == value


@pytest.mark.parametrize("name", ["index.html", "INDEX.HTM", "feed.xml", "page.html.j2", "page.xml.jinja2"])
def test_autoescape_for_html_and_xml(name):
    assert render_template("{{ v }}", name, {"v": "<a & 'b'>"}) == "&lt;a &amp; &#39;b&#39;&gt;"


@pytest.mark.parametrize("name", ["settings.toml", "settings.toml.j2", "nginx.conf", "html", "x.html.bak", "f"])
def test_no_autoescape_elsewhere(name):
    assert render_template("{{ v }}", name, {"v": "<a & 'b'>"}) == "<a & 'b'>"


def test_small_products_still_work():
    assert render_template("{{ 'ab' * 3 }} {{ 2 ** 10 }} {{ [0] * 2 }} {{ 10 ** 10 ** 10 }}", "f", {}) == (
        # Jinja's ** is left-associative: (10 ** 10) ** 10, a 101-digit number, not a refused one
        "ababab 1024 [0, 0] 1" + "0" * 100
    )


def test_problem_type_and_str():
    p = problem("a\n{{ nope }}")
    assert isinstance(p, Permanent) and isinstance(p, ValueError)
    assert p.line == 2
    assert str(p) == f"line 2: {p.message}"


# --- secrets -----------------------------------------------------------------------------------------


def test_placeholder_any_key_of_a_declared_secret():
    ctx = {"secrets": placeholder_secrets({"django": None, "db": ["USER", "PASSWORD"]})}
    out = render_template("{{ secrets.django.ANY }}|{{ secrets.django['OTHER_1'] }}|{{ secrets.db.USER }}",
                          "f", ctx)
    assert out == "<secret django/ANY>|<secret django/OTHER_1>|<secret db/USER>"


def test_placeholder_errors():
    ctx = {"secrets": placeholder_secrets({"django": None, "db": ["USER", "PASSWORD"]})}
    p = problem("\n{{ secrets.nope.KEY }}", ctx=ctx)
    assert p.line == 2 and "secrets.nope" in p.message and "django" in p.message
    p = problem("{{ secrets.db.PASWORD }}", ctx=ctx)
    assert "secrets.db.PASWORD" in p.message and "did you mean 'PASSWORD'" in p.message
    p = problem("{{ secrets.django['not a key'] }}", ctx=ctx)
    assert "secrets.django" in p.message


def test_unknown_secret_name_or_key_names_the_path():
    p = problem("x\n\n{{ secrets.django.NOPE }}")
    assert p.line == 3
    assert "secrets.django.NOPE" in p.message
    assert SECRET not in p.message and OTHER_SECRET not in p.message
    p = problem("{{ secrets.djang.SECRET_KEY }}")
    assert "secrets.djang" in p.message and "did you mean 'django'" in p.message
    p = problem("{{ secrets['nope']['X'] }}")
    assert "secrets.nope" in p.message


def test_a_whole_secret_is_not_a_value():
    for source in ("{{ secrets.django }}", "{{ secrets }}", "{{ secrets.django|string }}",
                   "{% for k in secrets.django %}{{ k }}{% endfor %}"):
        p = problem(source)
        assert SECRET not in p.message and OTHER_SECRET not in p.message


def test_secret_reprs_hold_no_value():
    s = secrets_context({"django": {"SECRET_KEY": SECRET}})
    assert SECRET not in repr(s)
    assert "django" in repr(s)
    assert render_template("{{ secrets.django|pprint }}", "f", {"secrets": s}) == "<secret django>"


def test_secret_internals_are_out_of_reach():
    for source in ("{{ secrets._secrets }}", "{{ secrets.django._values }}", "{{ secrets['_secrets'] }}",
                   "{{ secrets.django['_values'] }}", "{{ secrets.django|attr('_values') }}",
                   "{{ secrets.__class__ }}", "{{ secrets.django.__getitem__('SECRET_KEY') }}"):
        p = problem(source)
        assert SECRET not in p.message


LEAKY = [
    "{{ host[secrets.django.SECRET_KEY] }}",
    "{{ host[secrets.django.DB] }}",
    "{{ {}[secrets.django.SECRET_KEY] }}",
    "{{ secrets[secrets.django.SECRET_KEY] }}",
    "{{ secrets[secrets.django.DB].X }}",
    "{{ secrets.django[secrets.django.SECRET_KEY] }}",
    "{{ secrets.django[secrets.django.DB] }}",
    "{{ host|attr(secrets.django.DB) }}",
    "{{ ('{0[' ~ secrets.django.SECRET_KEY ~ ']}').format({}) }}",
    "{{ ('{0[' ~ secrets.django.DB ~ ']}').format({}) }}",
    "{{ ('{' ~ secrets.django.DB ~ '}').format() }}",
    "{{ ('%(' ~ secrets.django.DB ~ ')s') % {} }}",
    "{{ secrets.django.SECRET_KEY ~ (1 / 0) }}",
    "{{ secrets.django.SECRET_KEY + 1 }}",
    "{{ '%d' % secrets.django.SECRET_KEY }}",
    "{{ secrets.django.SECRET_KEY.nope }}",
    "{{ secrets.django.SECRET_KEY[100] }}",
    "{{ secrets.django.SECRET_KEY * 10 ** 7 }}",
    "{{ dict([secrets.django.SECRET_KEY]) }}",
    "{{ namespace(a=secrets.django.SECRET_KEY).b.c }}",
    "{{ secrets.django.SECRET_KEY|center(10 ** 9) }}",
    "{{ (secrets.django.SECRET_KEY ~ '')|list|sum }}",
    "{% set x = secrets.django.SECRET_KEY %}{{ x.__class__ }}",
    "{{ [secrets.django.SECRET_KEY].append(1) }}",
    "{% for x in range(1000000) %}{% endfor %}{{ secrets.django.SECRET_KEY }}",
]


@pytest.mark.parametrize("source", LEAKY)
def test_no_secret_value_in_any_error(source):
    p = problem("line one\n" + source)
    assert p.line == 2
    for text in (p.message, str(p), repr(p)):
        for value in (SECRET, OTHER_SECRET, repr(SECRET)[1:-1], "p%a,s", "w\\'rd", "hunter"):
            assert value not in text, (source, text)
    assert p.__cause__ is None and p.__context__ is None


# --- failures and their lines ------------------------------------------------------------------------


@pytest.mark.parametrize("source, line, words", [
    ("a\nb\n{% for x in y %}\n", 3, "endfor"),
    ("a\n{{ 1 + }}\n", 2, ""),
    ("a\n{% if %}", 2, ""),
    ("a\nb\n{{ x|no_such_filter }}", 3, "no_such_filter"),
    ("{{ 1 }}\n{{ hots.name }}", 2, "'hots' is undefined (did you mean 'host'?)"),
    ("\n\n\n{{ host.nmae }}", 4, "'nmae' (did you mean 'name'?)"),
    ("{% if true %}\n\n  {{ services['shop-web'].prot }}\n{% endif %}", 3, "'prot'"),
    ("a\n{{ [host.nmae] }}", 2, "'nmae'"),
    ("a\n{{ {'a': host.nmae}|pprint }}", 2, "'nmae'"),
    ("a\n{{ 1 / 0 }}", 2, "ZeroDivisionError"),
    ("a\nb\n{{ 'a' + 1 }}", 3, "TypeError"),
    ("{% macro f(x) %}\n{{ x / 0 }}\n{% endmacro %}\n\n{{ f(1) }}", 2, "ZeroDivisionError"),
    ("{% macro f() %}{{ f() }}{% endmacro %}\n{{ f() }}", 1, "RecursionError"),
    ("a\n{% for x in range(10 ** 6) %}{% endfor %}", 2, "MAX_RANGE"),
    ("a\n{{ ''.__class__ }}", 2, "not allowed in the sandbox"),
    ("a\n{% include 'other.j2' %}", 2, "{% include %} is not supported: a template is one file"),
    ("{% extends 'base.j2' %}", 1, "{% extends %} is not supported"),
    ("\n\n{% import 'm.j2' as m %}", 3, "{% import %} is not supported"),
    ("\n{% from 'm.j2' import x %}", 2, "{% from ... import %} is not supported"),
    ("{% if false %}\n{% include 'x' %}\n{% endif %}", 2, "include"),
])
def test_failure_lines(source, line, words):
    p = problem(source)
    assert p.line == line, p
    assert words in p.message


def test_output_above_one_mib_is_refused_with_its_line():
    source = "a\n{% for i in range(20000) %}\n{{ 'x' * 100 }}\n{% endfor %}\n"
    p = problem(source)
    assert "larger than" in p.message and str(MAX_OUTPUT_BYTES) in p.message
    assert p.line == 3
    # just under the limit is fine
    ok = "{% for i in range(10000) %}{{ 'x' * 100 }}{% endfor %}"
    assert len(render_template(ok, "f", {})) == 1_000_000


def test_unsafe_callables_are_refused():
    class Thing:
        @unsafe
        def wipe(self):
            raise AssertionError("must not be called")

        def delete(self):
            raise AssertionError("must not be called")

        delete.alters_data = True

    for source in ("{{ t.wipe() }}", "{{ t.delete() }}"):
        p = problem("\n" + source, ctx={"t": Thing()})
        assert p.line == 2 and "not allowed in the sandbox" in p.message


ABUSE = [
    "{{ 'a' * 10 ** 12 }}",
    "{{ 10 ** 12 * 'a' }}",
    "{{ [0] * 10 ** 9 }}",
    "{{ 10 ** (10 ** 10) }}",
    "{{ (10 ** 10) ** (10 ** 10) }}",
    "{{ 2 ** 100000 }}",
    "{% set a = 2 ** 60000 %}{{ a * a }}",
    "{{ ('a' * 1000000) + ('b' * 1000000) }}",
    "{{ '%0999999999d' % 1 }}",
    "{{ '%.999999999f' % 1 }}",
    "{{ '%*d' % (999999999, 1) }}",
    "{{ '%0999999999d'|format(1) }}",
    "{{ '{:>999999999}'.format(1) }}",
    "{{ '{:{w}}'.format(1, w=999999999) }}",
    "{{ '{0:>999999999}'.format_map({'0': 1}) }}",
    "{% set f = '{:>999999999}'.format %}{{ f(1) }}",
    "{{ 'x'.center(10 ** 9) }}",
    "{{ 'x'.ljust(10 ** 9) }}",
    "{{ 'x'.rjust(width=10 ** 9) }}",
    "{{ '1'.zfill(10 ** 9) }}",
    "{{ ('\t' * 1000).expandtabs(10 ** 6) }}",
    "{{ ('x' * 1000000).replace('', 'yy') }}",
    "{{ ('x' * 1000000).replace('x', 'yy') }}",
    "{{ ('x' * 1000000).join(['a', 'b', 'c']) }}",
    "{{ ('a' * 1000000).translate({97: 'bb'}) }}",
    "{{ 'x'|center(10 ** 9) }}",
    "{{ 'x'|center(width=10 ** 9) }}",
    "{{ 'x'|indent(10 ** 9, true) }}",
    r"{{ ('x\n' * 500000)|indent('    ') }}",
    "{{ [1]|batch(10 ** 9)|list }}",
    "{{ [1]|slice(10 ** 9)|list }}",
    "{{ ('x' * 1000000)|replace('x', 'yy') }}",
    "{{ ['x' * 1000000, 'y' * 1000000]|join }}",
    "{{ range(3)|join('x' * 1000000) }}",
    "{{ lipsum(10 ** 9) }}",
]


@pytest.mark.parametrize("source", ABUSE)
def test_resource_abuse_is_refused_before_it_is_computed(source):
    p = problem("ok\n" + source)
    assert p.line == 2, p


# the escape attempts from Jinja's sandbox documentation and its CVEs, and well-known SSTI payloads
ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ().__class__.__base__.__subclasses__() }}",
    "{{ [].__class__.__base__.__subclasses__()[40]('/etc/passwd').read() }}",
    "{{ (1).__class__ }}",
    "{{ ''['__class__'] }}",
    "{{ ''|attr('__class__') }}",
    "{{ ''|attr('__class__')|attr('__mro__') }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ joiner.__init__.__globals__.os.popen('id').read() }}",
    "{{ namespace.__init__.__globals__.os.popen('id').read() }}",
    "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "{{ range.__globals__ }}",
    "{{ cycler.reset.__code__ }}",
    "{{ dict.mro() }}",
    "{{ self.__init__.__globals__ }}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__.os }}",
    "{{ self.__dict__ }}",
    "{{ request.application.__globals__.__builtins__.__import__('os').popen('id').read() }}",
    "{{ config.__class__.__init__.__globals__['os'].popen('id').read() }}",
    "{{ '{0.__class__.__mro__}'.format('') }}",
    "{{ '{0.__class__}'.format_map({'0': ''}) }}",
    "{% set f = '{0.__class__}'.format %}{{ f('') }}",
    "{{ '{0.__class__}'|attr('format')('') }}",
    "{{ ('{0.__class__}'|attr('format'))('') }}",
    "{{ '{0.__class__}'|attr('format_map')({'0': ''}) }}",
    "{{ 'a'|map(attribute='__class__')|list }}",
    "{{ [].append(1) }}",
    "{{ [].pop() }}",
    "{{ {}.update(a=1) }}",
    "{{ {}.setdefault('a', 1) }}",
    "{% set x = [] %}{{ x.extend([1]) }}",
    "{{ host.groups.clear() }}",
    "{{ host.labels.pop('dc') }}",
]


@pytest.mark.parametrize("source", ESCAPES)
def test_sandbox_escapes_are_refused(source):
    p = problem("\n" + source)
    assert p.line == 2


def test_refused_mutation_leaves_the_context_alone():
    ctx = context()
    with pytest.raises(TemplateProblem):
        render_template("{{ host.groups.append('evil') }}", "f", ctx)
    assert ctx["host"]["groups"] == ["web", "eu"]
