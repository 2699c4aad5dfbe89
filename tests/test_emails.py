"""CONTRACT "Auth": every address people really use registers, is stored
lower-cased, logs in and can be added as a member; junk is a 422 on `email`."""

from typing import Any

import pytest
from quart.typing import TestClientProtocol as Client

from .support import PASSWORD, TestUser, create_project, create_user, login, problem_of

# The contract's examples, and the forms the old, narrower rule refused.
REAL_ADDRESSES = [
    "jean-pierre.de.la.fontaine@example.fr",
    "a.very.long.firstname.lastname@corp.example.com",
    "first.middle.last.jr@example.com",
    "one.two.three.four.five.six.seven@example.com",
    "an-atom-of-forty-characters-is-no-limit@example.com",
    "Ada.Lovelace+TaskFlow@Example.COM",
    "o'brien@example.ie",
    "user@xn--bcher-kva.de",
    "someone@mail.xn--80akhbyknj4f.xn--p1ai",
    "x@" + "a" * 63 + ".example.com",
    "x@" + "a-b" * 21 + ".example.com",
]

# The longest address: 64 + 1 + 63 + 1 + 63 + 1 + 57 + 4 = 254 characters.
LONGEST = "a" * 64 + "@" + "b" * 63 + "." + "c" * 63 + "." + "d" * 57 + ".com"

JUNK = [
    "",
    "   ",
    "plain",
    "@example.com",
    "a@",
    "two@at@example.com",
    "a b@example.com",
    "a@exa mple.com",
    "a@example.com.",
    ".a@example.com",
    "a.@example.com",
    "a..b@example.com",
    "a@example..com",
    "a@-example.com",
    "a@exa_mple.com",
    "a@localhost",
    "a@\x00example.com",
    "x@" + "a" * 64 + ".example.com",  # a label of 64 characters
    "a" * 64 + "@" + "b" * 63 + "." + "c" * 63 + "." + "d" * 58 + ".com",  # 255 characters
]


async def register(client: Client, email: Any) -> Any:
    return await client.post("/auth/register", json={"email": email, "password": PASSWORD})


@pytest.mark.parametrize("email", REAL_ADDRESSES, ids=lambda email: email[:40])
async def test_real_addresses_register_lower_cased_and_log_in(client: Client, email: str) -> None:
    response = await register(client, f"  {email}\t")
    assert response.status_code == 201, await response.get_json()
    user = await response.get_json()
    if "xn--" not in email:
        assert user["email"] == email.lower()
    await login(client, email)
    await login(client, email.upper())


async def test_the_longest_address_registers_and_one_more_character_does_not(
    client: Client,
) -> None:
    assert len(LONGEST) == 254
    response = await register(client, LONGEST)
    assert response.status_code == 201, await response.get_json()
    assert (await response.get_json())["email"] == LONGEST
    await login(client, LONGEST)
    assert (await register(client, LONGEST[:-4] + "d.com")).status_code == 422


@pytest.mark.parametrize("email", [*JUNK, 17, None, ["a@example.com"]], ids=repr)
async def test_junk_is_422_on_the_email_field(client: Client, email: Any) -> None:
    response = await register(client, email)
    payload = await response.get_json()
    problem_of(response, payload, 422, "validation_failed")
    assert [error["field"] for error in payload["errors"]] == ["email"], payload
    assert payload["errors"][0]["message"]


async def test_an_internationalised_domain_is_one_address_in_either_spelling(
    client: Client,
) -> None:
    # Stored as email-validator normalises it: the domain in Unicode.
    response = await register(client, "User@XN--BCHER-KVA.de")
    assert response.status_code == 201
    assert (await response.get_json())["email"] == "user@bücher.de"
    await login(client, "user@xn--bcher-kva.de")
    await login(client, "USER@BÜCHER.DE")
    taken = await register(client, "user@bücher.de")
    problem_of(taken, await taken.get_json(), 409, "conflict")


async def test_unicode_addresses_register_and_log_in(client: Client) -> None:
    # Internationalised local parts are accepted, as email-validator accepts them.
    response = await register(client, "Jürgen.Müller@Bücher.de")
    assert response.status_code == 201
    assert (await response.get_json())["email"] == "jürgen.müller@bücher.de"
    await login(client, "JÜRGEN.MÜLLER@xn--bcher-kva.de")


@pytest.mark.parametrize(
    ("registered", "sent"),
    [
        ("jean-pierre.de.la.fontaine@example.fr", " Jean-Pierre.de.la.Fontaine@EXAMPLE.fr "),
        ("first.middle.last.jr+tasks@example.com", "first.middle.last.jr+tasks@example.com"),
        ("someone@xn--bcher-kva.de", "someone@bücher.de"),
        ("x@" + "a" * 63 + ".example.com", "X@" + "A" * 63 + ".example.com"),
    ],
)
async def test_members_are_added_by_such_addresses(
    client: Client, owner: TestUser, registered: str, sent: str
) -> None:
    newcomer = await create_user(client, registered)
    project = await create_project(client, owner)
    response = await client.post(
        f"/projects/{project['id']}/members", json={"email": sent}, headers=owner.headers
    )
    assert response.status_code == 201, await response.get_json()
    member = await response.get_json()
    assert member["user_id"] == newcomer.id


@pytest.mark.parametrize("email", ["plain", "two@at@example.com", "a@example.com.", ""])
async def test_a_member_by_junk_is_422_not_404(client: Client, owner: TestUser, email: str) -> None:
    project = await create_project(client, owner)
    response = await client.post(
        f"/projects/{project['id']}/members", json={"email": email}, headers=owner.headers
    )
    payload = await response.get_json()
    problem_of(response, payload, 422, "validation_failed")
    assert [error["field"] for error in payload["errors"]] == ["email"], payload
