"""The text path: what a code says, said in words, finds the same value set (issue 13).

Real records arrive with codes the service does not know, or with no code at all: a problem-list entry typed
by hand, a display in the clinic's language, shorthand. These tests read the knowledge the way such records
do, by text alone (no coding), through the service's own matcher:
- every code and prefix display listed in a value set is found by that value set's text;
- each contraindication, written in every language the clinics use, with and without diacritics, is found;
- problem-list shorthand is found, and the same letters inside unrelated words are not;
- near misses (family history, negations, "rule out", suspected, screening) are not found.
"""

from __future__ import annotations

import pytest
import yaml

from cds.fhir.json import Coded
from cds.fhir.prefetch import TEMPLATES
from cds.knowledge.loader import load_knowledge

from conftest import ROOT

KB = load_knowledge(ROOT / "cards")
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml where present: thousands of listed codes
VALUESETS = {p.stem: yaml.load(p.read_text(encoding="utf-8"), Loader=LOADER)
             for p in sorted((ROOT / "cards" / "valuesets").glob("*.yaml"))}


def by_text(text: str) -> set[str]:
    """The value sets a record with this text and no code belongs to."""
    return set(KB.index.hits(Coded((), (text,))))


EXEMPT = yaml.safe_load((ROOT / "cards" / "text-exemptions.yaml").read_text(encoding="utf-8"))


def test_every_listed_display_is_found_by_text_alone() -> None:
    """Except the reviewed few in cards/text-exemptions.yaml (rare eponyms, labels with no safe word)."""
    missed, found, exempt = [], 0, 0
    for vs_id, data in VALUESETS.items():
        skip = set(EXEMPT.get(vs_id, {}).get("displays", []))
        for entry in data.get("codes", []) + data.get("prefixes", []):
            display = entry["display"]
            if vs_id in by_text(display) or _family(vs_id, display):
                found += 1
            elif display in skip:
                exempt += 1
            else:
                missed.append(f"{vs_id}: {display!r}")
    assert not missed, f"{len(missed)} displays not found by text, first: {missed[:15]}"
    assert found > 10 * exempt, (found, exempt)  # the exemptions stay the exception


def _family(vs_id: str, display: str) -> bool:
    """A relative's record matches only the family-history set, by design."""
    return "family-history" in by_text(display) and vs_id != "family-history"


# Each contraindication in English, Vietnamese (with and without diacritics), Polish, French, Spanish, German,
# Italian and Portuguese, as a clinician would write it on a problem list or in an order.
LANGUAGES: dict[str, list[str]] = {
    "pregnancy-conditions": [
        "Pregnant, 12 weeks", "Đang mang thai 12 tuần", "Dang mang thai 12 tuan", "Có thai", "W ciąży", "w ciazy",
        "Enceinte de 3 mois", "Grossesse en cours", "Embarazada", "Embarazo de 10 semanas", "Schwanger",
        "Frühschwangerschaft", "Gravidanza in corso", "Incinta", "Grávida", "Gravidez de 8 semanas",
        "Gestante"],
    "breastfeeding-conditions": [
        "Currently breastfeeding", "Đang cho con bú", "Dang cho con bu", "Nuôi con bằng sữa mẹ", "Karmi piersią",
        "Karmienie piersią", "Allaitement maternel", "Lactancia materna", "Amamantando", "Stillt", "Stillzeit",
        "Allattamento al seno", "Amamentação", "Aleitamento materno"],
    "insulin-dependent-diabetes": [
        "Type 1 diabetes mellitus", "Đái tháo đường tuýp 1", "Dai thao duong tuyp 1", "Tiểu đường type 1",
        "Đái tháo đường phụ thuộc insulin", "Cukrzyca typu 1", "Cukrzyca insulinozależna", "Diabète de type 1",
        "Diabète insulinodépendant", "Diabetes mellitus tipo 1", "Diabetes insulinodependiente",
        "Diabetes mellitus Typ 1", "Typ-1-Diabetes", "Insulinpflichtiger Diabetes", "Diabete di tipo 1",
        "Diabete insulino-dipendente", "Diabetes tipo 1", "Diabetes insulinodependente"],
    "cardiovascular-disease": [
        "Heart failure", "Suy tim", "Bệnh mạch vành", "Benh mach vanh", "Rung nhĩ", "Niewydolność serca",
        "Choroba wieńcowa", "Migotanie przedsionków", "Insuffisance cardiaque", "Fibrillation auriculaire",
        "Insuficiencia cardíaca", "Fibrilación auricular", "Herzinsuffizienz", "Koronare Herzkrankheit",
        "Vorhofflimmern", "Scompenso cardiaco", "Fibrillazione atriale", "Insuficiência cardíaca",
        "Fibrilação atrial", "Aortic valve stenosis", "Hẹp van hai lá", "Đột quỵ", "Schlaganfall"],
    "myocardial-infarction": [
        "Myocardial infarction", "Nhồi máu cơ tim", "Nhoi mau co tim", "Zawał serca", "Zawal miesnia sercowego",
        "Infarctus du myocarde", "Infarto agudo de miocardio", "Herzinfarkt", "Myokardinfarkt",
        "Infarto miocardico", "Infarto do miocárdio", "Enfarte do miocárdio"],
    "cancer": [
        "Malignant neoplasm of breast", "Ung thư vú", "Ung thu vu", "U ác tính", "Rak piersi",
        "Nowotwór złośliwy", "Cancer du sein", "Tumeur maligne", "Cáncer de mama", "Neoplasia maligna",
        "Brustkrebs", "Bösartiger Tumor", "Cancro al seno", "Tumore maligno", "Câncer de mama", "Carcinoma"],
    "clotting-disorders": [
        "Haemophilia A", "Rối loạn đông máu", "Roi loan dong mau", "Máu khó đông", "Zaburzenia krzepnięcia",
        "Hémophilie", "Troubles de la coagulation", "Trastorno de la coagulación", "Hemofilia",
        "Gerinnungsstörung", "Disturbo della coagulazione", "Distúrbio da coagulação", "Von Willebrand disease"],
    "immunodeficiency": [
        "Kidney transplant recipient", "Suy giảm miễn dịch", "Suy giam mien dich", "Ghép thận",
        "Niedobór odporności", "Przeszczep nerki", "Immunodépression", "Greffe de rein", "Inmunodeficiencia",
        "Trasplante renal", "Immunschwäche", "Nierentransplantation", "Immunodeficienza", "Trapianto di rene",
        "Imunodeficiência", "Transplante renal"],
    "skin-lesions": [
        "Open wound of scalp", "Vết thương hở", "Vet thuong ho", "Nhiễm trùng da", "Mụn trứng cá",
        "Otwarta rana", "Zakażenie skóry", "Plaie ouverte", "Infection cutanée", "Herida abierta",
        "Infección cutánea", "Offene Wunde", "Hautinfektion", "Ferita aperta", "Infezione cutanea",
        "Ferida aberta", "Infecção cutânea", "Surgical site infection"],
    "sensitive-skin": [
        "Sensitive skin", "Da nhạy cảm", "Da nhay cam", "Viêm da cơ địa", "Wrażliwa skóra",
        "Atopowe zapalenie skóry", "Peau sensible", "Dermatite atopique", "Piel sensible", "Dermatitis atópica",
        "Empfindliche Haut", "Neurodermitis", "Pelle sensibile", "Dermatite atopica", "Pele sensível"],
    "anticoagulant-medications": [
        "Warfarin 5 mg", "Xarelto 20 mg", "Eliquis 5 mg", "Clexane 40 mg", "Plavix 75 mg", "Aspirin 81 mg",
        "Thuốc chống đông", "Acide acétylsalicylique", "Ácido acetilsalicílico", "Sintrom 4 mg", "Marcoumar"],
    "insulin-medications": [
        "Insulin glargine", "Lantus SoloStar", "NovoRapid FlexPen", "Tresiba", "Insuline", "Insulina",
        "Humulin 70/30", "Xultophy", "Soliqua"],
    "immunosuppressant-medications": [
        "Methotrexate 2.5 mg", "Humira 40 mg pen", "Prograf 1 mg", "CellCept 500 mg", "Prednisone 20 mg",
        "Stelara", "Xeljanz", "Thuốc ức chế miễn dịch"],
    "postpartum": [
        "Postpartum state", "Sau sinh", "Đẻ thường", "Połóg", "Post-partum", "Accouchement", "Posparto",
        "Wochenbett", "Dopo il parto", "Pós-parto", "Caesarean section"],
    "severe-reactions": [
        "Anaphylaxis", "Throat swelling", "Difficulty breathing", "Hypotension", "Sốc phản vệ", "Soc phan ve",
        "Wstrząs anafilaktyczny", "Choc anaphylactique", "Anafilaxia", "Anaphylaktischer Schock",
        "Shock anafilattico", "Choque anafilático"],
}


@pytest.mark.parametrize("vs_id", sorted(LANGUAGES))
def test_each_contraindication_in_every_language(vs_id: str) -> None:
    missed = [text for text in LANGUAGES[vs_id] if vs_id not in by_text(text)]
    assert not missed, f"{vs_id} misses {missed}"


SHORTHAND: dict[str, list[str]] = {
    "myocardial-infarction": ["MI 2019", "Old MI", "STEMI", "NSTEMI", "Hx MI", "s/p AMI", "IDM en 2018",
                              "IAM 2020", "NMCT"],
    "cardiovascular-disease": ["CAD", "CHF", "HFrEF", "HFpEF", "AF", "AFib", "DVT 2023", "PE", "CABG x3",
                               "CVA 2019", "TIA", "KHK"],
    "insulin-dependent-diabetes": ["T1DM", "IDDM", "DM1", "DM type 1", "LADA", "ĐTĐ typ 1"],
    "cancer": ["Ca breast", "Ca of colon", "CA prostate", "breast Ca", "NSCLC", "CLL", "DLBCL", "BCC nose"],
    "clotting-disorders": ["VWD", "ITP", "DIC"],
    "immunodeficiency": ["HIV", "AIDS", "CVID", "GVHD"],
    "skin-lesions": ["SSI", "HSV lip"],
    "no-known-allergy": ["NKDA", "NKA", "No known drug allergies", "Denies any allergies", "Không dị ứng"],
    "anticoagulant-use": ["DOAC", "on DAPT", "VKA"],
}


@pytest.mark.parametrize("vs_id", sorted(SHORTHAND))
def test_problem_list_shorthand(vs_id: str) -> None:
    missed = [text for text in SHORTHAND[vs_id] if vs_id not in by_text(text)]
    assert not missed, f"{vs_id} misses {missed}"


# Near misses: the same letters or words where they do not mean the contraindication.
NEAR_MISSES: dict[str, list[str]] = {
    "myocardial-infarction": ["Mild acne", "Family history of myocardial infarction", "Mind", "mi madre", "MIGRAINE",
                              "Rule out MI", "No MI", "Risk of heart attack", "Admin note", "Mitral regurgitation"],
    "cardiovascular-disease": ["AFTER meal", "Safe", "CADASIL screening negative", "Pes planus", "Pessary",
                               "Essential hypertension", "Father: heart failure", "No CHF", "PEARL", "Perfume"],
    "insulin-dependent-diabetes": ["Non-insulin-dependent diabetes mellitus", "Type 2 diabetes mellitus",
                                   "Prediabetes", "Family history of type 1 diabetes", "Diabetes type 2",
                                   "Không phụ thuộc insulin"],
    "cancer": ["Benign neoplasm of colon", "Cancer screening", "Breast cancer in mother", "Suspected lung cancer",
               "Cafe au lait spot", "Calcium supplement", "Cancerophobia", "Carcinoma ruled out", "Screening for Ca"],
    "pregnancy-conditions": ["Not pregnant", "Pregnancy test negative", "Khong co thai", "Nie jest w ciąży",
                             "Pas enceinte", "No embarazada", "Nicht schwanger", "Non incinta", "Não grávida",
                             "History of pregnancy", "Contraception counselling"],
    "immunodeficiency": ["Hair transplant 2020", "Hearing aids", "HIV test negative",
                         "Awaiting transplantation of kidney", "Screening for HIV"],
    "skin-lesions": ["Cellulite", "Peptic ulcer", "Wound healed", "Genital herpes", "Lipoma", "Aphthous ulcer"],
    "no-known-allergy": ["Penicillin allergy", "Allergy to NSAIDs"],
    "clotting-disorders": ["No bleeding disorder", "DICTATION", "Family history of haemophilia"],
}


@pytest.mark.parametrize("vs_id", sorted(NEAR_MISSES))
def test_near_misses_are_not_found(vs_id: str) -> None:
    wrong = [text for text in NEAR_MISSES[vs_id] if vs_id in by_text(text)]
    assert not wrong, f"{vs_id} wrongly matches {wrong}"


def test_the_fetch_asks_for_every_code_the_pregnancy_rules_read() -> None:
    """The pregnancyStatus query (prefetch template and FHIR fallback) and the value sets must not drift."""
    query = next(t.query for t in TEMPLATES if t.key == "pregnancyStatus")
    asked = {part.rpartition("|")[2] for part in query.split("code=", 1)[1].split(",")}
    read = {c["code"] for name in ("pregnancy-status-code", "pregnancy-test-code", "estimated-delivery-date-code",
                                   "gestational-age-code") for c in VALUESETS[name]["codes"] if c["system"] == "loinc"}
    assert asked == read
